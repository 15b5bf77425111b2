"""Offloaded checkpointing ("unsloth" mode) gives the gradients of plain backward and of ordinary checkpointing,
with LoRA dropout replayed identically and two forward passes in flight at once. On the CPU the offloader's
copies are plain copies; the autograd path (anchor, recomputation, RNG replay, buffer pool) is the GPU's."""

from __future__ import annotations

import pytest
import torch

from gazelle.lora import LoraConfig
from gazelle.lora.inject import inject_lora
from tests.lora import gazelle_logits, model_pair, next_token_loss, padded_batch, randomize_lora
from tests.lora import one_thread  # noqa: F401  (an autouse fixture)


def lora_model(family: str, dropout: float = 0.0):
    _, model = model_pair(family)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout))
    randomize_lora(model)
    return model.train()


def grads(model, mode, ids, mask, seed=0) -> dict[str, torch.Tensor]:
    model.gradient_checkpointing = mode != "off"
    model.checkpoint_offload = mode == "unsloth"
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    next_token_loss(gazelle_logits(model, ids, mask), ids, mask).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_offloaded_checkpointing_gives_the_same_gradients(family, dropout):
    model = lora_model(family, dropout)
    ids, mask = padded_batch()
    plain, checkpointed, offloaded = (grads(model, m, ids, mask) for m in ("off", "on", "unsloth"))
    assert plain and plain.keys() == offloaded.keys()
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(offloaded[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(offloaded[name], checkpointed[name], atol=0, rtol=0, msg=name)


def test_two_forward_passes_before_their_backwards():
    """Each forward pass keeps its own saved inputs: backward of the first after the second's forward is exact."""
    model = lora_model("llama")
    ids, mask = padded_batch()
    ids2, mask2 = padded_batch(seed=1)
    expected = [grads(model, "off", i, m) for i, m in ((ids, mask), (ids2, mask2))]
    model.checkpoint_offload = model.gradient_checkpointing = True
    model.zero_grad(set_to_none=True)
    first = next_token_loss(gazelle_logits(model, ids, mask), ids, mask)
    second = next_token_loss(gazelle_logits(model, ids2, mask2), ids2, mask2)
    first.backward()
    got_first = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    second.backward()
    for name, g in got_first.items():
        torch.testing.assert_close(g, expected[0][name], atol=1e-6, rtol=1e-5, msg=name)
        total = model.get_parameter(name).grad
        torch.testing.assert_close(total, expected[0][name] + expected[1][name], atol=1e-6, rtol=1e-5, msg=name)
    assert len(model._offloader._free) == 2 * model.config.num_layers  # every buffer went back to the pool


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_loading_a_layer_prefetches_the_inputs_of_the_layers_ahead_below_it(ahead):
    """load(i) gives back exactly what save(i) took and leaves the next `ahead` inputs below already copied back
    (two when layer weights stream over the same link: gazelle.models.offload.OffloadSession)."""
    from gazelle.models.offload import ActivationOffloader

    inputs = [torch.randn(3, 5) + i for i in range(6)]
    session = ActivationOffloader().session(ahead)
    for i, x in enumerate(inputs):
        session.save(i, x)
    for i in reversed(range(6)):
        torch.testing.assert_close(session.load(i), inputs[i], rtol=0, atol=0)
        assert sorted(session._loading) == list(range(max(0, i - ahead), i))
    with pytest.raises(ValueError, match="ahead"):
        ActivationOffloader().session(0)
