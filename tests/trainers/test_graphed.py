"""CUDA-graph replay of the training micro-batch (gazelle.trainers.graphed): on a GPU, training through captured
graphs gives the losses and adapter values of plain eager training (accumulation over micro-batches, two batch
shapes, an optimizer step between replays, grads set to None); on the CPU the runner is the eager step."""

from __future__ import annotations

import pytest
import torch

from gazelle.errors import GazelleError
from gazelle.kernels import dispatch
from gazelle.lora import LoraConfig, lora_parameters
from gazelle.lora.inject import inject_lora
from gazelle.losses.cross_entropy import cross_entropy_sum
from gazelle.models.host_embeddings import HostEmbeddings
from gazelle.quant import quantize_model
from gazelle.trainers.graphed import GraphedStep
from tests.kernels.check import needs_gpu
from tests.lora import model_pair, randomize_lora


def lora_model(family: str, device: str, nf4: bool = False, ckpt: str = "unsloth"):
    return for_training(model_pair(family)[1], device, nf4, ckpt)


def for_training(model, device: str, nf4: bool = False, ckpt: str = "unsloth"):
    """model (4-bit base if nf4) with non-zero r=4 adapters on every linear, checkpointing `ckpt`, in training mode."""
    if nf4:
        model = quantize_model(model, torch.float32)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(model)
    model.gradient_checkpointing = ckpt != "off"
    model.checkpoint_offload = ckpt == "unsloth"
    return model.to(device).train()


def batch(rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """A padded micro-batch as SFTTrainer makes it: the last row ends early; its padding has no target."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[-1, length - 3:] = 0
    targets = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1).masked_fill(
        torch.cat([mask[:, 1:], torch.zeros(rows, 1, dtype=torch.long)], dim=1) == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def sft_loss(model):
    def loss(b):
        hidden = model(b["input_ids"], attention_mask=b["attention_mask"], inputs_embeds=b.get("inputs_embeds"))
        return cross_entropy_sum(model.logits, hidden, b["targets"], model.config.vocab_size)
    return loss


# Four optimizer steps of two micro-batches; shapes (2, 10) and (3, 7) interleave, so with warmup=1 each is run
# eagerly once, captured once and replayed; step 3 starts from grads set to None.
STEPS = [[(2, 10, 0), (2, 10, 1)], [(2, 10, 2), (3, 7, 3)], [(3, 7, 4), (2, 10, 5)], [(3, 7, 6), (2, 10, 7)]]


def train(model, graphed: bool, host: bool = False) -> tuple[list[float], list[torch.Tensor], GraphedStep]:
    """host: the embedding table and head in host memory (HostEmbeddings), as the trainer keeps them."""
    params = list(lora_parameters(model))
    tables = HostEmbeddings(model) if host else None
    if tables is not None:
        tables.enable()
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)  # fused: writes without bumping version counters
    runner = GraphedStep(sft_loss(model), params, warmup=1)
    losses = []
    for i, step in enumerate(STEPS):
        batches = [batch(*spec) for spec in step]
        if tables is not None:
            batches = [tables.inputs(b) for b in batches]
        tokens = sum(int((b["targets"] != -100).sum()) for b in batches)
        for b in batches:
            if graphed:
                loss_sum, _ = runner(b, 1.0 / tokens)
            else:
                loss_sum, _ = sft_loss(model)({k: v.to(device) for k, v in b.items()})
                (loss_sum / tokens).backward()
            losses.append(float(loss_sum))
        opt.step()
        opt.zero_grad(set_to_none=not graphed or i == 1)  # after step 2 the runner finds the grads gone
    if tables is not None:
        tables.disable()
    return losses, [p.detach().clone() for p in params], runner


def reference_losses(family: str, device: str, nf4: bool, ckpt: str, monkeypatch) -> list[float]:
    """The oracle: the same training through plain autograd over the LoRA modules (no kernels, no kept casts)."""
    with monkeypatch.context() as m:
        m.setenv("GAZELLE_KERNELS", "ref")
        return train(lora_model(family, device, nf4, ckpt), graphed=False)[0]


@needs_gpu
@pytest.mark.parametrize("family, nf4, ckpt, host", [
    ("llama", False, "unsloth", False), ("qwen2", False, "unsloth", False), ("llama", False, "off", False),
    ("llama", True, "unsloth", False), ("llama", False, "unsloth", True), ("qwen2", True, "unsloth", True)])
def test_graphed_training_equals_eager_training(family, nf4, ckpt, host, monkeypatch):
    """host: the graphed run keeps the embedding table and head in host memory (qwen2's tiny model ties them)."""
    expected = reference_losses(family, "cuda", nf4, ckpt, monkeypatch)
    eager_losses, eager_params, _ = train(lora_model(family, "cuda", nf4, ckpt), graphed=False)
    model = lora_model(family, "cuda", nf4, ckpt)
    table = model.model.embed_tokens.weight.detach().clone()
    losses, params, runner = train(model, graphed=True, host=host)
    assert model.model.embed_tokens.weight.is_cuda and torch.equal(model.model.embed_tokens.weight, table)
    assert model.lm_head.weight.is_cuda
    assert runner.failure is None
    assert runner.captured == 2 and runner.replays == 6  # 8 micro-batches: 2 eager warm-ups, 6 from graphs
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), atol=0, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), atol=1e-5, rtol=1e-5)
    moved = 0
    for got, want, start in zip(params, eager_params, lora_parameters(lora_model(family, "cpu", nf4, ckpt))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        moved += not torch.equal(want.cpu(), start.detach())
    assert moved == len(params)  # every adapter trained: the comparison is not between untouched tensors


def test_on_the_cpu_the_runner_is_the_eager_step(monkeypatch):
    """No capture on the CPU; with the kernels (under the interpreter, kept casts and all) and a fused optimizer
    the losses are the reference's at every micro-batch: a cast left stale by a step would show from step 2 on."""
    if not dispatch.interpreting():
        pytest.skip("CPU tensors take the kernels only under Triton's interpreter (the CPU suite)")
    expected = reference_losses("llama", "cpu", False, "unsloth", monkeypatch)
    monkeypatch.setenv("GAZELLE_KERNELS", "triton")
    losses, _, runner = train(lora_model("llama", "cpu"), graphed=True)
    assert runner.captured == 0 and runner.replays == 0
    assert losses == pytest.approx(expected, rel=1e-5)


def test_cuda_graphs_true_without_a_gpu_is_an_error(tmp_path):
    from gazelle.trainers.sft import SFTConfig, SFTTrainer
    from tests.trainers.helpers import text_rows, word_tokenizer

    model = lora_model("llama", "cpu")
    trainer = SFTTrainer(model, word_tokenizer(), text_rows(4), SFTConfig(output_dir=str(tmp_path), max_steps=1,
                                                                          cuda_graphs=True, save_strategy="no"))
    with pytest.raises(GazelleError, match="cuda_graphs=True cannot apply: the model is on cpu"):
        trainer.train()
    assert not model.draws_random()
    _, dropping = model_pair("llama")
    inject_lora(dropping, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    assert dropping.train().draws_random() and not dropping.eval().draws_random()


@needs_gpu
def test_sft_trainer_on_the_gpu_graphs_and_host_embeddings_change_nothing(tmp_path):
    """SFTTrainer as users run it on a GPU (CUDA graphs and host embeddings by default) logs the losses of the
    same training with both off, and hands the model back with its tables on the device."""
    from gazelle.trainers.sft import SFTConfig, SFTTrainer
    from tests.trainers.helpers import text_rows, word_tokenizer

    runs = {}
    for on in (True, False):
        model = lora_model("llama", "cuda")
        args = SFTConfig(output_dir=str(tmp_path / str(on)), max_steps=6, per_device_train_batch_size=2,
                         packing=True, max_seq_length=16, learning_rate=1e-2, save_strategy="no", seed=0,
                         cuda_graphs=None if on else False, offload_embeddings=None if on else False)
        trainer = SFTTrainer(model, word_tokenizer(), text_rows(40), args)
        graphed = []
        trainer._graphed_step = lambda opt, make=trainer._graphed_step: graphed.append(make(opt)) or graphed[-1]
        trainer.train()
        runs[on] = [m["loss"] for m in trainer.metrics]
        if on:
            assert graphed[0] is not None and graphed[0].replays > 0
            assert model.model.embed_tokens.weight.is_cuda and model._host_embeddings is None
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_offload_embeddings_true_without_a_gpu_is_an_error(tmp_path):
    from gazelle.models.host_embeddings import why_not
    from gazelle.trainers.sft import SFTConfig, SFTTrainer
    from tests.trainers.helpers import text_rows, word_tokenizer

    model = lora_model("llama", "cpu")
    assert why_not(model) == "the model is on cpu, not CUDA"
    trainer = SFTTrainer(model, word_tokenizer(), text_rows(4), SFTConfig(
        output_dir=str(tmp_path), max_steps=1, offload_embeddings=True, save_strategy="no"))
    with pytest.raises(GazelleError, match="offload_embeddings=True cannot apply: the model is on cpu"):
        trainer.train()
    model.model.embed_tokens.weight.requires_grad_(True)
    assert why_not(model) == "the embedding or the head is trained"
