"""Layers streamed from host memory (gazelle.models.host_layers): training and inference give exactly what they
give with every layer on the device; the schedule copies each streamed layer once a pass (plus the slots at a
forward's start); a layer's frozen tensors are views of a device slot only while it runs; the model is handed back
whole. On the CPU the copies are plain; on a GPU the same runs on the side stream, under CUDA graphs, for dense and
NF4 bases, with the device memory of count - slots layers given back."""

from __future__ import annotations

import pytest
import torch
import transformers

from gazelle.errors import GazelleError
from gazelle.lora import lora_parameters
from gazelle.losses.cross_entropy import cross_entropy_sum
from gazelle.models.config import from_hf_config
from gazelle.models.decoder import Decoder
from gazelle.models.host_layers import HostLayers, spread
from gazelle.trainers.graphed import GraphedStep
from tests.kernels.check import needs_gpu
from tests.lora import one_thread  # noqa: F401  (an autouse fixture)
from tests.tiny import COMMON
from tests.trainers.test_graphed import for_training

LAYERS = 7


def deep_model(seed: int = 0, nf4: bool = False, device: str = "cpu", ckpt: str = "unsloth") -> Decoder:
    """A tiny llama of 7 layers with non-zero adapters, in training mode with the checkpointing `ckpt`."""
    torch.manual_seed(seed)
    model = Decoder(from_hf_config(transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": LAYERS}).to_dict()))
    return for_training(model, device, nf4, ckpt)


def batch(seed: int, rows: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (rows, length), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1)
    return {"input_ids": ids, "targets": targets}


def loss_of(model):
    def loss(b):
        return cross_entropy_sum(model.logits, model(b["input_ids"]), b["targets"], model.config.vocab_size)
    return loss


def train(model, streamed: int = 0, slots: int = 2, steps: int = 3, graphed: bool = False):
    """AdamW steps over fixed batches; (losses, adapters after, the HostLayers or None)."""
    layers = None
    if streamed:
        layers = HostLayers(model, streamed, slots)
        layers.enable()
    params = list(lora_parameters(model))
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=1e-2, fused=device.type == "cuda")
    runner = GraphedStep(loss_of(model), params, warmup=1) if graphed else None
    losses = []
    for step in range(steps):
        b = {k: v.to(device) for k, v in batch(step).items()}
        tokens = int((b["targets"] != -100).sum())
        if runner is not None:
            loss_sum, _ = runner(b, 1.0 / tokens)
        else:
            loss_sum, _ = loss_of(model)(b)
            (loss_sum / tokens).backward()
        losses.append(float(loss_sum.detach()))
        opt.step()
        opt.zero_grad(set_to_none=runner is None)
    if runner is not None:
        assert runner.failure is None and runner.replays == steps - 1  # the capture replays too
    return losses, [p.detach().clone() for p in params], layers


def test_spread_ends_at_the_top_and_spaces_evenly():
    assert spread(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert spread(28, 10) == [1, 4, 7, 10, 13, 15, 18, 21, 24, 27]
    assert spread(7, 7) == list(range(7)) and spread(7, 1) == [6]


@pytest.mark.parametrize("streamed, slots", [(4, 2), (3, 1), (7, 2)])
def test_training_with_streamed_layers_is_exactly_training_without(streamed, slots):
    expected, adapters, _ = train(deep_model())
    model = deep_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses, got, layers = train(model, streamed, slots)
    assert losses == expected
    for a, b in zip(got, adapters):
        assert torch.equal(a, b)
    # the slots once, then per step each streamed layer beyond them in forward and in backward
    assert layers.copies == slots + 3 * 2 * (streamed - slots)
    layers.disable()
    assert model._host_layers is None
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]) and p.untyped_storage().nbytes() == p.nbytes, name


def test_weights_are_slot_views_only_while_their_layer_runs():
    model = deep_model()
    layers = HostLayers(model, 4, 2)
    layers.enable()
    slots = [(b.data_ptr(), b.data_ptr() + b.nbytes) for b in layers._buffers]
    in_slot = lambda t: any(lo <= t.data_ptr() < hi for lo, hi in slots)  # noqa: E731
    seen = []

    def check(index):
        seen.append((index, in_slot(model.model.layers[index].mlp.down_proj.base_layer.weight)))
        for other in layers.indices:  # every other streamed layer points at its host copy meanwhile
            if other != index:
                assert not in_slot(model.model.layers[other].self_attn.q_proj.base_layer.weight)

    for i, layer in enumerate(model.model.layers):  # the recomputation calls the layer's forward, not the layer
        layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: check(i))
    b = batch(0)
    loss_sum, _ = loss_of(model)(b)
    loss_sum.backward()
    streamed = set(layers.indices)
    forward = seen[:LAYERS]
    assert forward == [(i, i in streamed) for i in range(LAYERS)]
    # backward recomputes every layer, top down, with the streamed ones in a slot again
    assert seen[LAYERS:] == [(i, i in streamed) for i in reversed(range(LAYERS))]
    assert not any(in_slot(model.model.layers[i].mlp.up_proj.base_layer.weight) for i in streamed)


def test_inference_with_streamed_layers_equals_the_device_model():
    model = deep_model().eval()
    ids = batch(3)["input_ids"]
    with torch.no_grad():
        expected = model.logits(model(ids))
        layers = HostLayers(model, 5, 2)
        layers.enable()
        got = model.logits(model(ids))
        again = model.logits(model(ids))
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert layers.copies == 2 + 2 * 5  # the slots once, then each forward every layer (the last two for the next)


def test_what_cannot_stream_is_an_error():
    model = deep_model(ckpt="on")
    with pytest.raises(GazelleError, match="needs offloaded gradient checkpointing"):
        HostLayers(model, 2).enable()
    with pytest.raises(GazelleError, match="stream_layers=8 exceeds the 7 checkpointed layers"):
        HostLayers(deep_model(), 8)
    model = deep_model()
    model.uncheckpointed_layers = 3
    with pytest.raises(GazelleError, match="stream_layers=5 exceeds the 4 checkpointed layers"):
        HostLayers(model, 5)
    model = deep_model()
    HostLayers(model, 3).enable()
    model.eval()  # no checkpointing in eval mode: autograd would keep views of the slots
    with pytest.raises(GazelleError, match="only under offloaded checkpointing"):
        model(batch(0)["input_ids"])


def test_sft_trainer_streams_layers_and_hands_the_model_back(tmp_path):
    from gazelle import FastLanguageModel
    from gazelle.trainers.sft import SFTConfig, SFTTrainer
    from tests.models.test_packing import gazelle_model
    from tests.trainers.helpers import text_rows, word_tokenizer

    runs = []
    for streamed in (0, 2):
        model = FastLanguageModel.get_peft_model(gazelle_model("llama"), r=4, lora_alpha=8,
                                                 use_gradient_checkpointing="unsloth")
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        args = SFTConfig(output_dir=str(tmp_path / str(streamed)), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-3, save_strategy="no", seed=1, disable_tqdm=True, stream_layers=streamed,
                         eval_strategy="steps", eval_steps=1)
        trainer = SFTTrainer(model, word_tokenizer(), text_rows(8, seed=2), args,
                             eval_dataset=text_rows(4, seed=5))
        trainer.train()
        assert model._host_layers is None
        for name, p in model.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, frozen[name]) and p.untyped_storage().nbytes() == p.nbytes, name
        # evaluations between steps (no autograd, eval mode) run the streamed layers too
        assert len(trainer.eval_metrics) == 3
        losses = [m["loss"] for m in trainer.metrics] + [m["eval_loss"] for m in trainer.eval_metrics]
        runs.append((losses, [p.detach().clone() for p in lora_parameters(model)]))
    (losses, adapters), (streamed_losses, streamed_adapters) = runs
    assert streamed_losses == losses
    assert all(torch.equal(a, b) for a, b in zip(streamed_adapters, adapters))
    with pytest.raises(GazelleError, match="stream_layers must be >= 0"):
        SFTConfig(output_dir=str(tmp_path), stream_layers=-1)


def test_uncheckpointed_layers_train_as_checkpointed_ones_and_are_never_streamed(tmp_path):
    """The top layers without checkpointing (activations kept): the same losses and adapters as every layer
    checkpointed, nothing recomputed for them, with the layers below streamed; the model's setting comes back."""
    from gazelle.trainers.sft import SFTConfig, SFTTrainer
    from tests.trainers.helpers import text_rows, word_tokenizer

    runs = []
    for unchecked in (0, 3):
        model = deep_model()
        recomputed = []
        for i, layer in enumerate(model.model.layers):
            layer.recompute = lambda *a, i=i, f=layer.recompute: recomputed.append(i) or f(*a)
        args = SFTConfig(output_dir=str(tmp_path / str(unchecked)), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-3, save_strategy="no", seed=1, disable_tqdm=True,
                         uncheckpointed_layers=unchecked, stream_layers=3 if unchecked else 0)
        trainer = SFTTrainer(model, word_tokenizer(), text_rows(8, seed=3), args)
        trainer.train()
        assert model.uncheckpointed_layers == 0 and model._host_layers is None
        # two steps, each recomputing the checkpointed layers top down
        assert recomputed == 2 * list(reversed(range(LAYERS - unchecked)))
        runs.append(([m["loss"] for m in trainer.metrics], [p.detach().clone() for p in lora_parameters(model)]))
    (losses, adapters), (unchecked_losses, unchecked_adapters) = runs
    assert unchecked_losses == pytest.approx(losses, rel=1e-6, abs=0)
    for a, b in zip(unchecked_adapters, adapters):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(GazelleError, match="uncheckpointed_layers must be >= 0"):
        SFTConfig(output_dir=str(tmp_path), uncheckpointed_layers=-1)
    model = deep_model()
    model.uncheckpointed_layers = 2
    HostLayers(model, 3).enable()
    model.uncheckpointed_layers = 5  # now a streamed layer would run under autograd
    with pytest.raises(GazelleError, match="stream none of the uncheckpointed_layers"):
        model(batch(0)["input_ids"])


@pytest.mark.parametrize("ahead", [2, 1])
def test_in_backward_the_inputs_below_are_queued_before_each_weight_copy(monkeypatch, ahead):
    """Copies to the device run in the order issued (one copy engine): a streamed layer's weights, copied at the end of
    a layer's backward, must not hold up the inputs the next two layers' recomputations read. So by then the input of
    the layer two below must be on its way already: true with the decoder's two-ahead prefetch while layers stream,
    false with one ahead (the check fails then, which the ahead=1 case asserts). With uncheckpointed layers on top,
    the top checkpointed layer's input is on its way at the end of the forward."""
    from gazelle.models import offload

    events = []
    prefetch, copy, load = offload.OffloadSession.prefetch, HostLayers._copy, offload.OffloadSession.load
    monkeypatch.setattr(offload.OffloadSession, "prefetch",
                        lambda self, i: (i in self._saved and i not in self._loading and events.append(("input", i)))
                        or prefetch(self, i))
    monkeypatch.setattr(offload.OffloadSession, "load", lambda self, i: events.append(("load", i)) or load(self, i))
    monkeypatch.setattr(HostLayers, "_copy", lambda self, i, slot: events.append(("weights", i)) or copy(self, i, slot))
    if ahead == 1:
        real = offload.ActivationOffloader.session
        monkeypatch.setattr(offload.ActivationOffloader, "session", lambda self, _=1: real(self, 1))
    model = deep_model()
    model.uncheckpointed_layers = 1
    layers = HostLayers(model, 3)  # of layers 0-5: 1, 3, 5
    layers.enable()
    b = batch(0)
    loss_sum, _ = loss_of(model)(b)
    forward_end = len(events)
    assert ("input", 5) in events[:forward_end]  # the top checkpointed layer's, under the uncheckpointed one
    loss_sum.backward()
    backward = events[forward_end:]
    issued, late, running = set(), [], None
    for kind, i in backward:
        if kind == "input":
            issued.add(i)
        elif kind == "load":
            running = i  # the layer whose recomputation and backward run now
        elif running is not None:  # weights copied at the end of `running`'s backward
            late += sorted({running - 1, running - 2} & set(range(6)) - issued)
    if ahead == 2:
        assert not late and any(k == "weights" for k, _ in backward)
    else:
        assert late  # what the H100 trace showed: an input's copy issued behind a layer's weights


@needs_gpu
@pytest.mark.parametrize("nf4, graphed", [(False, False), (False, True), (True, True)])
def test_on_the_gpu_streamed_training_equals_device_training(nf4, graphed):
    expected, adapters, _ = train(deep_model(nf4=nf4, device="cuda"), steps=4, graphed=graphed)
    model = deep_model(nf4=nf4, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layers = HostLayers(model, 5, 2)
    layers.enable()
    tensors = [t for e in layers._layers.values() for t in e.tensors]
    freed = sum(-(-t.nbytes // 512) * 512 for t in tensors)  # the allocator's blocks are multiples of 512 bytes
    assert before - torch.cuda.memory_allocated() == freed - layers.device_bytes > 0
    layers.disable()
    losses, got, layers = train(model, 5, 2, steps=4, graphed=graphed)
    assert losses == pytest.approx(expected, rel=1e-6, abs=0)
    for a, b in zip(got, adapters):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    layers.disable()
