"""The engine against the reference loop: same greedy tokens, n samples sharing a prefill, seeds, compaction."""

import pytest
import torch

from gazelle.generation.engine import Engine
from gazelle.generation.reference import generate
from gazelle.generation.sampling import SamplingParams
from tests.models.test_packing import gazelle_model
from tests.tiny import FAMILIES

PROMPT_LENGTHS = (7, 12, 3)


def prompts(seed=0, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def reference_greedy(model, batch: list[list[int]], max_new_tokens: int, eos=()) -> list[list[int]]:
    """The reference loop on a left-padded batch, cut after each sequence's first EOS."""
    T = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(batch):
        ids[row, T - len(p):] = torch.tensor(p)
        mask[row, T - len(p):] = 1
    out = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=list(eos), pad_token_id=0)
    results = []
    for row in out[:, T:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_reference_with_n_samples(family):
    model = gazelle_model(family)
    batch = prompts()
    expected = reference_greedy(model, batch, 20)  # crosses phi3's longrope switch at 16 tokens
    engine = Engine(model, prefill_chunk=5, sync_every=4)  # small chunks and syncs exercise both paths
    got = engine.generate(batch, max_new_tokens=20, n=2)
    assert got == [seq for seq in expected for _ in range(2)], family


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_prefill_in_groups_of_rows_equals_reference(family, monkeypatch):
    """A token budget smaller than the batch splits the prefill into groups of rows (and chunks) and runs the MLP
    in tiles: same tokens."""
    from gazelle.models import decoder

    tiles, real = [], decoder.tiled

    def spy(fn, x, tile, **options):
        tiles.append(tile)
        return real(fn, x, tile, **options)

    monkeypatch.setattr(decoder, "tiled", spy)
    model = gazelle_model(family)
    batch = prompts(seed=3, lengths=(9, 4, 13, 6, 11))
    expected = reference_greedy(model, batch, 8)
    tiles.clear()
    # MLP tiles of 3 tokens; a forward takes 4 x 3 // 5 = 2 rows x 5 tokens
    engine = Engine(model, prefill_chunk=5, prefill_tokens=3)
    assert engine.generate(batch, max_new_tokens=8, n=2) == [seq for seq in expected for _ in range(2)]
    assert engine.cache.row_offset == 0
    assert tiles and set(tiles) == {3}, "the prefill's MLP did not run in tiles"


def test_eos_stops_and_compacts():
    model = gazelle_model("llama")
    batch = prompts(seed=1, lengths=(5, 9, 4, 11))
    free = reference_greedy(model, batch, 24)
    eos = free[1][3]  # a token the second sequence emits early
    expected = reference_greedy(model, batch, 24, eos=(eos,))
    engine = Engine(model, sync_every=2)
    assert engine.generate(batch, max_new_tokens=24, eos_token_ids=[eos]) == expected
    assert any(len(seq) < 24 for seq in expected), "nothing stopped early: the test proves nothing"


def test_seeded_sampling_reproducible():
    model = gazelle_model("qwen3")
    engine = Engine(model)
    params = SamplingParams(do_sample=True, temperature=1.2, top_p=0.9)
    runs = [engine.generate(prompts(), 12, params, n=3, seed=s) for s in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert len({tuple(r) for r in runs[0][:3]}) > 1, "the 3 samples of one prompt should differ"


def test_smollm2_greedy_equals_reference(smollm2_gguf):
    from gazelle.models.loading import load

    model, tokenizer = load(smollm2_gguf, dtype=torch.float32)
    texts = ["What is 2+2?", "Name three colours of the rainbow, please.", "Hi"]
    batch = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for t in texts]
    batch = [list(b["input_ids"]) if isinstance(b, dict) else list(b) for b in batch]
    eos = [tokenizer.eos_token_id]
    expected = reference_greedy(model, batch, 24, eos=eos)
    got = Engine(model).generate(batch, max_new_tokens=24, n=2, eos_token_ids=eos)
    assert got == [seq for seq in expected for _ in range(2)]
    assert "4" in tokenizer.decode(got[0])


def test_generation_after_an_optimizer_step_uses_the_updated_adapter(tmp_path):
    from gazelle import FastLanguageModel, SFTConfig, SFTTrainer
    from tests.trainers.helpers import text_rows, word_tokenizer

    model = FastLanguageModel.get_peft_model(gazelle_model("llama"), r=4, lora_alpha=8)
    engine = model.engine()
    batch = prompts(seed=3)
    before = engine.generate(batch, max_new_tokens=10)
    assert before == reference_greedy(model, batch, 10)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, learning_rate=5e-2, save_strategy="no", disable_tqdm=True)
    SFTTrainer(model, word_tokenizer(), text_rows(8), args).train()
    model.train()  # as between steps of an RL loop: the engine samples without dropout and restores the mode
    after = engine.generate(batch, max_new_tokens=10)
    assert model.training
    assert after != before, "the adapter update did not reach generation"
    assert after == reference_greedy(model.eval(), batch, 10)


def test_fast_generate_with_chat_messages(smollm2_gguf):
    from gazelle import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_gguf, max_seq_length=256)
    texts = model.fast_generate([[{"role": "user", "content": "What is 2+2?"}], "The capital of France is"],
                                {"temperature": 0, "max_tokens": 16})
    assert len(texts) == 2 and "4" in texts[0] and "Paris" in texts[1]


@pytest.mark.parametrize("lora", [False, True])
def test_decode_step_traces_as_one_graph(lora):
    """torch.compile sees the whole decode step (a graph break would leave parts of it eager, launch by launch)."""
    from gazelle import FastLanguageModel

    model = gazelle_model("llama")
    if lora:
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    engine = Engine(model, compile=False, cuda_graphs=False)
    engine.generate(prompts(), 2)  # makes the cache and the step's buffers
    with torch.inference_mode():
        explained = torch._dynamo.explain(engine._decode_step)(len(PROMPT_LENGTHS), SamplingParams(), None)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
