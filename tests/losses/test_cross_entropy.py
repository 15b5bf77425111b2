"""Chunked log-probs and cross-entropy equal the whole-logits computation, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from gazelle.losses.cross_entropy import IGNORE_INDEX, cross_entropy_sum, token_log_probs


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_equals_full_in_float64(chunk, softcap):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 37, (3, 11), generator=g)
    targets[0, :4] = IGNORE_INDEX

    def head(h):
        logits = h @ weight.T
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap

    # The chunked path computes in float32 by design; compare against a float64 reference.
    loss, count = cross_entropy_sum(lambda h: head(h.double()), hidden, targets, 37, chunk_tokens=chunk)
    ref = F.cross_entropy(head(hidden).reshape(-1, 37), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    assert count == (targets != IGNORE_INDEX).sum()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for got, want in zip(grads, ref_grads):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_temperature_and_ignored_positions():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(20, 8, generator=g)
    targets = torch.randint(0, 20, (2, 5), generator=g)
    targets[1, 2] = IGNORE_INDEX
    got = token_log_probs(lambda h: h @ weight.T, hidden, targets, 20, temperature=0.7, chunk_tokens=3)
    ref = torch.log_softmax(hidden @ weight.T / 0.7, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    ref[1, 2] = 0.0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
