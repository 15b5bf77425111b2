"""SFT invariants: accumulation equivalence, packing equivalence, exact resume after a kill, bad inputs."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from gazelle.errors import GazelleError
from gazelle.trainers.sft import SFTConfig, SFTTrainer
from tests.models.test_packing import gazelle_model
from tests.trainers.helpers import text_rows, word_tokenizer


def full_model(family="llama", dtype=torch.float32):
    model = gazelle_model(family).to(dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_model(family="llama", dtype=torch.float32):
    from gazelle import FastLanguageModel

    model = gazelle_model(family).to(dtype)
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)


def config(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path), max_steps=3, learning_rate=1e-3, save_strategy="no", seed=1,
                  disable_tqdm=True)
    return SFTConfig(**{**fields, **overrides})


def test_batch_4_equals_batch_1_times_accumulation_4(tmp_path):
    rows, tok = text_rows(12), word_tokenizer()
    runs = []
    for batch, accumulation in ((4, 1), (1, 4)):
        # float64, so that Adam's normalisation cannot blow rounding noise of near-zero gradients up
        model = full_model(dtype=torch.float64)
        trainer = SFTTrainer(model, tok, rows, config(tmp_path / f"b{batch}", per_device_train_batch_size=batch,
                                                      gradient_accumulation_steps=accumulation))
        trainer.train()
        runs.append((model.state_dict(), [m["loss"] for m in trainer.metrics]))
    (params_a, losses_a), (params_b, losses_b) = runs
    assert losses_a == pytest.approx(losses_b, rel=1e-5, abs=0)
    for name in params_a:
        diff = (params_a[name] - params_b[name]).abs().max().item()
        assert diff <= 1e-9, f"{name} differs by {diff:.2e}"
    initial = gazelle_model("llama").double().state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert (params_a["model.layers.0.mlp.up_proj.weight"] - initial).abs().max() > 1e-4, "nothing trained"


def test_lora_batch_4_equals_batch_1_times_accumulation_4(tmp_path):
    """The adapter after 3 steps, in fp32, with gradient checkpointing on: within 1e-5."""
    rows, tok = text_rows(12, seed=4), word_tokenizer()
    adapters, losses = [], []
    for batch, accumulation in ((4, 1), (1, 4)):
        model = lora_model()
        trainer = SFTTrainer(model, tok, rows, config(tmp_path / f"b{batch}", per_device_train_batch_size=batch,
                                                      gradient_accumulation_steps=accumulation, learning_rate=1e-2))
        trainer.train()
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        losses.append([m["loss"] for m in trainer.metrics])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=0)
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 2 * 7 * 3
    for name, value in adapters[0].items():
        diff = (value - adapters[1][name]).abs().max().item()
        assert diff <= 1e-5, f"{name} differs by {diff:.2e}"
    assert any(v.abs().max() > 0 for n, v in adapters[0].items() if "lora_B" in n), "lora_B never moved"


def test_packed_and_padded_batches_give_the_same_loss(tmp_path):
    rows, tok = text_rows(10, seed=3), word_tokenizer()
    losses = []
    for packing in (False, True):
        model = full_model("mistral")  # sliding window 5 is shorter than the packed rows
        trainer = SFTTrainer(model, tok, rows, config(tmp_path / str(packing), packing=packing, max_seq_length=64))
        batches = list(trainer.batches(0))
        with torch.no_grad():
            sums = [trainer.loss(b) for b in batches]
        losses.append(sum(s for s, _ in sums) / sum(n for _, n in sums))
        if packing:
            assert len(batches[0]["input_ids"]) < len(rows), "rows were not packed"
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from gazelle.trainers.sft import SFTConfig, SFTTrainer
    from tests.trainers.test_sft import lora_model, text_rows, word_tokenizer

    class KillDuringStep:
        def on_step_begin(self, trainer):
            if trainer.global_step == {kill_at}:  # step {kill_at_1} is starting
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [KillDuringStep()] if {kill} else []
    args = SFTConfig(output_dir=sys.argv[1], max_steps=10, save_steps=2, learning_rate=1e-2, seed=5,
                     per_device_train_batch_size=2, disable_tqdm=True)
    trainer = SFTTrainer(lora_model(), word_tokenizer(), text_rows(14, seed=9), args, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True)
""")


def run_training(output_dir, kill: bool) -> subprocess.CompletedProcess:
    script = KILLED_RUN.format(root=os.getcwd(), kill_at=6, kill_at_1=7, kill=kill)
    return subprocess.run([sys.executable, "-c", script, str(output_dir)], capture_output=True, text=True, timeout=300)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    straight = run_training(tmp_path / "straight", kill=False)
    assert straight.returncode == 0, straight.stderr
    killed = run_training(tmp_path / "killed", kill=True)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path / "killed")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "config.json",
                                                        "metrics.jsonl"]
    resumed = run_training(tmp_path / "killed", kill=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "checkpoint-6" in resumed.stderr
    final_a = load_file(tmp_path / "straight" / "checkpoint-10" / "adapter_model.safetensors")
    final_b = load_file(tmp_path / "killed" / "checkpoint-10" / "adapter_model.safetensors")
    assert len(final_a) == 2 * 7 * 3  # lora_A and lora_B of 7 targets in 3 layers
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), f"{name} differs after resume"


def test_bad_inputs_are_named(tmp_path):
    tok = word_tokenizer()
    with pytest.raises(GazelleError, match="learning_rate must be > 0"):
        config(tmp_path, learning_rate=0.0)
    with pytest.raises(GazelleError, match="train_dataset is empty"):
        SFTTrainer(full_model(), tok, [], config(tmp_path))
    with pytest.raises(GazelleError, match=r"no 'text' column .*\['question'\]"):
        SFTTrainer(full_model(), tok, [{"question": "w3 w4"}], config(tmp_path))
    trainer = SFTTrainer(full_model(), tok, text_rows(4, lengths=(20, 30)), config(tmp_path, max_seq_length=8,
                                                                                   overlong="error"))
    with pytest.raises(GazelleError, match="row 0 has .* tokens, more than max_seq_length=8"):
        trainer.train()


def test_overlong_rows_are_truncated_and_counted(tmp_path, capfd):
    trainer = SFTTrainer(full_model(), word_tokenizer(), text_rows(4, lengths=(20, 30)), config(tmp_path, max_seq_length=8))
    examples = trainer.examples()
    assert all(len(e["input_ids"]) == 8 for e in examples)
    assert "4 rows truncated to 8 tokens" in capfd.readouterr().err


def test_checkpoint_of_another_model_is_refused(tmp_path):
    tok, rows = word_tokenizer(), text_rows(6)
    SFTTrainer(full_model("llama"), tok, rows, config(tmp_path, max_steps=1, save_strategy="steps")).train()
    other = SFTTrainer(full_model("qwen3"), tok, rows, config(tmp_path, max_steps=2))
    with pytest.raises(GazelleError, match="saved from another model"):
        other.train(resume_from_checkpoint=True)


def test_qlora_trains_adapters_over_nf4_layers(tmp_path):
    from gazelle import FastLanguageModel
    from gazelle.quant.linear4bit import Linear4bit
    from tests.tiny import tiny_hf_model

    tiny_hf_model("qwen2").save_pretrained(tmp_path / "base")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "base"), load_in_4bit=True, device_map="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    bases = [m.base_layer for n, m in model.named_modules() if n.endswith("q_proj")]
    assert bases and all(isinstance(b, Linear4bit) for b in bases)
    packed = bases[0].weight.clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = SFTTrainer(model, word_tokenizer(), text_rows(8), config(tmp_path / "out", max_steps=2,
                                                                         learning_rate=1e-2))
    trainer.train()
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.rsplit(".", 2)[-2].startswith("lora_") for n in after)
    assert any(not torch.equal(before[n], after[n]) for n in after)
    assert torch.equal(bases[0].weight, packed), "the 4-bit base must stay frozen"


def test_eval_dataset_loss_is_logged(tmp_path):
    import json

    model, rows = lora_model(), text_rows(8)
    trainer = SFTTrainer(model, word_tokenizer(), rows, config(tmp_path, max_steps=4, eval_strategy="steps",
                                                               eval_steps=2, learning_rate=1e-2), eval_dataset=rows[:4])
    trainer.train()
    assert [m["step"] for m in trainer.eval_metrics] == [2, 4]
    assert trainer.eval_metrics[1]["eval_loss"] < trainer.eval_metrics[0]["eval_loss"]  # it trains on those rows
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_loss" in r for r in logged) == 2
    # evaluate() equals a plain full-logits cross-entropy over the same rows, one row at a time.
    tok, losses, tokens = word_tokenizer(), 0.0, 0
    with torch.no_grad():
        for row in rows[:4]:
            ids = torch.tensor([tok(row["text"])["input_ids"]])
            logits = model.logits(model(ids))[0, :-1]
            losses += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    assert trainer.evaluate()["eval_loss"] == pytest.approx(losses / tokens, rel=1e-5)


def test_mlp_tile_mb_tiles_training_without_changing_it(tmp_path, monkeypatch):
    """mlp_tile_mb: with offloaded checkpointing every layer's MLP runs in tiles (forward and recomputation), the
    losses and the adapter are those of the untiled run, and the model's own setting is back after training."""
    from gazelle import FastLanguageModel
    from gazelle.models import decoder

    rows, tok = text_rows(8, seed=6), word_tokenizer()
    tile_sizes = []
    tiled = decoder.tiled
    monkeypatch.setattr(decoder, "tiled",
                        lambda block, x, tile, **kw: tile_sizes.append(tile) or tiled(block, x, tile, **kw))
    runs = []
    for tile_mb in (None, 3 * 1536 / 2**20):  # 3 tokens of the tiny MLP's 1,536 bytes a token
        model = FastLanguageModel.get_peft_model(gazelle_model("llama"), r=4, lora_alpha=8,
                                                 use_gradient_checkpointing="unsloth")
        before = [layer.mlp.light_tile_bytes for layer in model.model.layers]
        trainer = SFTTrainer(model, tok, rows, config(tmp_path / str(tile_mb), per_device_train_batch_size=4,
                                                      mlp_tile_mb=tile_mb))
        trainer.train()
        assert [layer.mlp.light_tile_bytes for layer in model.model.layers] == before
        adapter = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
        runs.append(([m["loss"] for m in trainer.metrics], adapter, list(tile_sizes)))
        tile_sizes.clear()
    (losses, whole, tiles_whole), (tiled_losses, parts, tiles) = runs
    # each of 3 steps: every layer's forward and its recomputation, in tiles of 3 tokens
    assert tiles_whole == [] and tiles == [3] * (2 * 3 * len(model.model.layers)), (tiles_whole, tiles)
    assert tiled_losses == pytest.approx(losses, rel=1e-5, abs=0)
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(GazelleError, match="mlp_tile_mb must be >= 0"):
        config(tmp_path, mlp_tile_mb=-1)
