"""The tiled MLP (gazelle.models.tiling): the same outputs and gradients as the whole sequence at once, LoRA dropout
replayed, with and without (offloaded) checkpointing around it."""

from __future__ import annotations

import pytest
import torch

from gazelle.models import tiling
from gazelle.models.tiling import tiled
from tests.lora import gazelle_logits, next_token_loss, padded_batch
from tests.lora import one_thread  # noqa: F401  (an autouse fixture)
from tests.models.test_offload import lora_model


def grads(model, mode: str, ids, mask, tile_bytes: int | None, light_tile_bytes: int | None = None):
    for layer in model.model.layers:
        layer.mlp.tile_bytes = tile_bytes
        layer.mlp.light_tile_bytes = light_tile_bytes
    model.gradient_checkpointing = mode != "off"
    model.checkpoint_offload = mode == "unsloth"
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    next_token_loss(gazelle_logits(model, ids, mask), ids, mask).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])  # separate gate/up, fused gate_up, gelu + sandwich
@pytest.mark.parametrize("mode", ["off", "unsloth"])
def test_tiled_mlp_gives_the_gradients_of_the_whole_sequence(family, mode, monkeypatch):
    model = lora_model(family)
    ids, mask = padded_batch()
    calls = []
    monkeypatch.setattr(tiling._Tiled, "backward", _counting(tiling._Tiled.backward, calls))
    whole = grads(model, mode, ids, mask, tile_bytes=None)
    assert not calls
    # 3 x intermediate (128) x 4 bytes = 1536 bytes a token: tiles of 3 tokens, tiled past 12 (the batch has 20)
    parts = grads(model, mode, ids, mask, tile_bytes=3 * 1536)
    assert len(calls) == len(model.model.layers), "every layer's MLP ran tiled"
    assert whole.keys() == parts.keys() and whole
    for name in whole:
        assert whole[name].abs().max() > 0, name
        torch.testing.assert_close(parts[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_tiled_recomputation_gives_the_gradients_of_the_whole_sequence(family, monkeypatch):
    """Offloaded checkpointing's forward (no autograd) and recomputation (its values left out) run the MLP in
    tiles: the gradients stay those of the whole sequence at once."""
    model = lora_model(family)
    ids, mask = padded_batch()
    calls = []
    monkeypatch.setattr(tiling._Tiled, "backward", _counting(tiling._Tiled.backward, calls))
    whole = grads(model, "unsloth", ids, mask, tile_bytes=None)
    assert not calls
    # 1536 bytes a token against 4608: 7 tiles, of 3 tokens, over the batch's 20
    parts = grads(model, "unsloth", ids, mask, tile_bytes=None, light_tile_bytes=3 * 1536)
    assert calls == [3] * len(model.model.layers), "every layer's recomputation ran tiled"
    for name in whole:
        assert whole[name].abs().max() > 0, name
        torch.testing.assert_close(parts[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)
    calls.clear()
    dropping = lora_model(family, dropout=0.3)  # its forward drew the dropout untiled: the recomputation must too
    grads(dropping, "unsloth", ids, mask, tile_bytes=None, light_tile_bytes=3 * 1536)
    assert not calls


def test_tiled_mlp_replays_lora_dropout_under_offloaded_checkpointing():
    """Tiles draw their dropout masks in another order than one whole pass, so compare tiled with tiled: plain
    backward and offloaded checkpointing (two more recomputations of every tile) must agree exactly."""
    model = lora_model("llama", dropout=0.3)
    ids, mask = padded_batch()
    plain, offloaded = (grads(model, mode, ids, mask, tile_bytes=3 * 1536) for mode in ("off", "unsloth"))
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(offloaded[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def _counting(backward, calls: list):
    def wrapped(ctx, grad_out):
        calls.append(ctx.tile)
        return backward(ctx, grad_out)
    return staticmethod(wrapped)


def test_tiled_equals_the_function_tile_by_tile_in_value_and_every_gradient():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(6, 10), torch.nn.Linear(10, 6)
    fn = lambda t: lin2(torch.nn.functional.dropout(torch.tanh(lin1(t)), 0.3))  # noqa: E731
    x = torch.randn(2, 13, 6, requires_grad=True)
    g = torch.randn(2, 13, 6)
    by_hand = lambda t: torch.cat([fn(piece) for piece in t.reshape(-1, 6).split(4)]).view(2, 13, 6)  # noqa: E731
    results = []
    for run in (by_hand, lambda t: tiled(fn, t, 4)):
        x.grad = lin1.weight.grad = lin2.weight.grad = None
        torch.manual_seed(1)
        out = run(x)
        out.backward(g)
        results.append((out.detach(), x.grad, lin1.weight.grad, lin2.weight.grad))
    torch.manual_seed(2)
    assert not torch.equal(by_hand(x), results[0][0]), "dropout draws differ by seed"
    for whole, parts in zip(*results):
        torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-6)


def test_only_the_parameters_need_gradients_and_no_grad_is_a_plain_loop():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(9, 4)
    tiled(lin, x, 2).sum().backward()
    expected = torch.autograd.grad(lin(x).sum(), lin.weight)[0]
    torch.testing.assert_close(lin.weight.grad, expected)
    with torch.no_grad():
        torch.testing.assert_close(tiled(lin, x, 2), lin(x))
    with pytest.raises(ValueError, match="tile"):
        tiled(lin, x, 0)
