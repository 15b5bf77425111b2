"""Chunked linear cross-entropy (lm_head + log-softmax in Triton) against the whole-logits torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gazelle.kernels import linear_cross_entropy as lce
from gazelle.kernels.linear_cross_entropy import (
    IGNORE_INDEX,
    default_chunk_tokens,
    linear_cross_entropy,
    linear_log_probs,
    linear_log_probs_ref,
)
from gazelle.losses.cross_entropy import token_log_probs
from tests.kernels.check import (
    assert_matches,
    forward_backward,
    needs_gpu,
    needs_interpreter,
)

N, H, V = 37, 24, 203  # odd, V not a power of 2


def decoder_softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The decoder's final soft-capping (gazelle.models.decoder.softcap), restated so the oracle stands alone."""
    return x if cap is None else torch.tanh(x / cap) * cap


def _problem(n=N, h=H, v=V, dtype=torch.float32, device="cpu", weight_grad=True, seed=0, scale=1.0):
    """hidden (n, h), weight (v, h) with logits of std ~ 5 * scale, targets (n,) with every 5th token ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * scale * 5 / h**0.5).to(device, dtype).requires_grad_(weight_grad)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, targets


def _is_ours(t: torch.Tensor, function: str = "LinearLogProbs") -> bool:
    """Whether t comes from the Triton autograd.Function (through the final reshape's view)."""
    fn = t.grad_fn
    while fn is not None and function not in type(fn).__name__ and "View" in type(fn).__name__:
        fn = fn.next_functions[0][0]
    return fn is not None and function in type(fn).__name__


@needs_interpreter
@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_log_probs_match_reference(triton_mode, cap, temperature, weight_grad):
    """Forward and grads wrt hidden (and weight) under random per-token upstream grads, chunks of 8 (37 = 4x8 + 5)."""
    hidden, weight, targets = _problem(weight_grad=weight_grad, scale=4.0 if cap else 1.0)

    def fast(h, w):
        out = linear_log_probs(h, w, targets, cap, temperature, chunk_tokens=8)
        assert _is_ours(out)
        return out

    assert_matches(fast, lambda h, w: linear_log_probs_ref(h, w, targets, cap, temperature), [hidden, weight])
    out = linear_log_probs(hidden, weight, targets, cap, temperature, chunk_tokens=8)
    assert out.dtype == torch.float32 and (out[targets == IGNORE_INDEX] == 0).all()


@needs_interpreter
@pytest.mark.parametrize("block_v, split_blocks", [(32, 2), (32, 1), (64, 4)])
def test_rows_split_over_programs(triton_mode, monkeypatch, block_v, split_blocks):
    """Small vocab blocks so that a row of 203 spans several programs (32 x 2: 4 splits, the last one block and
    that partly masked; 32 x 1: 7 splits; 64 x 4: one split with dead lanes)."""
    monkeypatch.setattr(lce, "_BLOCK_V", block_v)
    monkeypatch.setattr(lce, "_SPLIT_BLOCKS", split_blocks)
    hidden, weight, targets = _problem(seed=7, scale=4.0)
    assert_matches(lambda h, w: linear_log_probs(h, w, targets, 30.0, 0.7, chunk_tokens=16),
                   lambda h, w: linear_log_probs_ref(h, w, targets, 30.0, 0.7), [hidden, weight])


@needs_interpreter
def test_leading_dims_other_ignore_index_and_one_chunk(triton_mode):
    """hidden (B, T, H) -> (B, T); ignore_index -1; default chunk (all tokens in one) and chunks of one token."""
    hidden, weight, targets = _problem(n=2 * 9)
    targets = targets.masked_fill(targets == IGNORE_INDEX, -1).view(2, 9)
    hidden = hidden.detach().view(2, 9, H).requires_grad_()

    def ref(h, w):
        return linear_log_probs_ref(h.reshape(-1, H), w, targets.reshape(-1), 5.0, 1.3, ignore_index=-1).view(2, 9)

    for chunk in (None, 1):
        out = linear_log_probs(hidden, weight, targets, 5.0, 1.3, ignore_index=-1, chunk_tokens=chunk)
        assert out.shape == (2, 9) and _is_ours(out)
        assert_matches(lambda h, w: linear_log_probs(h, w, targets, 5.0, 1.3, -1, chunk), ref, [hidden, weight])


@needs_interpreter
@pytest.mark.parametrize("cap", [None, 30.0])
def test_cross_entropy_matches_torch(triton_mode, cap):
    hidden, weight, targets = _problem(seed=4, scale=3.0)
    loss, count = linear_cross_entropy(hidden, weight, targets, softcap=cap, chunk_tokens=8)
    loss.backward()
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logits = decoder_softcap(h_ref @ w_ref.t(), cap)
    ref = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    assert count.item() == (targets != IGNORE_INDEX).sum().item() == 29
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, h_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, w_ref.grad, atol=1e-5, rtol=1e-5)
    mean, _ = linear_cross_entropy(hidden, weight, targets, softcap=cap, reduction="mean", chunk_tokens=8)
    torch.testing.assert_close(mean, ref / 29, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_no_grad_and_all_ignored(triton_mode):
    hidden, weight, targets = _problem(n=6)
    with torch.no_grad():
        out = linear_log_probs(hidden, weight, targets, chunk_tokens=4)
    torch.testing.assert_close(out, linear_log_probs_ref(hidden, weight, targets).detach(), atol=1e-5, rtol=1e-5)
    ignored = torch.full((6,), IGNORE_INDEX)
    loss, count = linear_cross_entropy(hidden, weight, ignored, chunk_tokens=4)
    loss.backward()
    assert loss.item() == 0 and count.item() == 0
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()
    empty = linear_log_probs(hidden[:0], weight, targets[:0])
    assert empty.shape == (0,)


@needs_interpreter
@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("peak", ["first", "last", "random"])
def test_streamed_head_matches_reference(triton_mode, cap, temperature, chunk, peak):
    """A frozen head read in slices of 64 rows (203 = 3 x 64 + 11): the online max / sum / accumulator over slices,
    all tokens in one chunk or chunks of 8 (each reading every slice again). peak: the largest logits lie in the
    first slice (later slices never raise the max), in the last one (every slice rescales the state) or anywhere.
    float32 both sides; atol 5e-5 since those rows, 3x larger, give hidden gradients of up to ~30 whose sums over
    the vocabulary run in another order (seen: 1.5e-5)."""
    hidden, weight, targets = _problem(weight_grad=False, scale=4.0 if cap else 1.0)
    with torch.no_grad():
        if peak == "first":
            weight[:64] *= 3
        elif peak == "last":
            weight[192:] *= 3

    def fast(h):
        out = linear_log_probs(h, weight, targets, cap, temperature, chunk_tokens=chunk, vocab_slice=64)
        assert _is_ours(out, "StreamedLogProbs")
        return out

    assert_matches(fast, lambda h: linear_log_probs_ref(h, weight, targets, cap, temperature), [hidden],
                   tol=(5e-5, 1e-5))


@needs_interpreter
def test_streamed_head_bf16_leading_dims_and_no_grad(triton_mode):
    """bf16 (judged against float32 on the same values), hidden (B, T, H), ignore_index -1, slices of 50 rows and
    one slice bigger than the vocabulary; without grad the forward alone."""
    hidden, weight, targets = _problem(n=2 * 9, dtype=torch.bfloat16, weight_grad=False, seed=3)
    targets = targets.masked_fill(targets == IGNORE_INDEX, -1).view(2, 9)
    hidden = hidden.detach().view(2, 9, H).requires_grad_()

    def ref(h):
        out = linear_log_probs_ref(h.reshape(-1, H), weight.float(), targets.reshape(-1), 5.0, ignore_index=-1)
        return out.view(2, 9)

    for rows in (50, 256):
        assert_matches(lambda h: linear_log_probs(h, weight, targets, 5.0, ignore_index=-1, vocab_slice=rows),
                       ref, [hidden], dtype=torch.bfloat16)
    with torch.no_grad():
        out = linear_log_probs(hidden, weight, targets, 5.0, ignore_index=-1, vocab_slice=50)
    torch.testing.assert_close(out, ref(hidden.float()).detach(), atol=2e-2, rtol=2e-2)
    assert (out[targets == -1] == 0).all()
    empty = linear_log_probs(hidden[:0], weight, targets[:0], vocab_slice=50)
    assert empty.shape == (0, 9)


def test_streamed_head_needs_a_frozen_weight_and_falls_back_whole(monkeypatch):
    hidden, weight, targets = _problem(seed=8)
    with pytest.raises(ValueError, match="must be frozen"):
        linear_log_probs(hidden, weight, targets, vocab_slice=64)
    monkeypatch.setenv("GAZELLE_KERNELS", "ref")  # the reference reads the whole head
    weight = weight.detach()
    assert_matches(lambda h: linear_log_probs(h, weight, targets, 30.0, 0.7, vocab_slice=64),
                   lambda h: linear_log_probs_ref(h, weight, targets, 30.0, 0.7), [hidden])


def test_reference_agrees_with_losses_token_log_probs():
    """The oracle is the existing checkpointed loss of gazelle.losses (lm_head + soft-capping as the head)."""
    hidden, weight, targets = _problem(seed=5, scale=3.0)
    head = lambda h: decoder_softcap(h @ weight.t(), 30.0)  # noqa: E731
    ref = token_log_probs(head, hidden, targets, V, temperature=0.7, chunk_tokens=8)
    torch.testing.assert_close(linear_log_probs_ref(hidden, weight, targets, 30.0, 0.7), ref, atol=1e-5, rtol=1e-5)


def test_ref_mode_runs_the_chunked_reference(monkeypatch):
    """GAZELLE_KERNELS=ref (and CPU under auto): the reference, checkpointed over chunks, same values and grads."""
    monkeypatch.setenv("GAZELLE_KERNELS", "ref")
    hidden, weight, targets = _problem(seed=6)
    out = linear_log_probs(hidden, weight, targets, 30.0, 0.7, chunk_tokens=8)
    assert not _is_ours(out)
    assert_matches(lambda h, w: linear_log_probs(h, w, targets, 30.0, 0.7, chunk_tokens=8),
                   lambda h, w: linear_log_probs_ref(h, w, targets, 30.0, 0.7), [hidden, weight])


def test_default_chunk():
    assert default_chunk_tokens(151936, torch.bfloat16) == 832  # 883 rounded down to 64s: 256 MB of bf16 logits
    assert default_chunk_tokens(151936, torch.float32) == 384
    assert default_chunk_tokens(2**27, torch.float32) == 1  # vocab too big for even one token: still 1
    assert default_chunk_tokens(203, torch.float32) % 64 == 0


# ------------------------------------------------------------------------------------------------------ GPU


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _reference_in_chunks(hidden, weight, targets, grad, cap, chunk=1024):
    """linear_log_probs_ref in float32 chunk by chunk: log-probs and grads of <log_probs, grad> (hidden, weight)."""
    weight32 = weight.detach().float().requires_grad_()
    outs, grads_h = [], []
    for s in range(0, hidden.shape[0], chunk):
        h32 = hidden[s : s + chunk].detach().float().requires_grad_()
        lp = linear_log_probs_ref(h32, weight32, targets[s : s + chunk], cap)
        lp.backward(grad[s : s + chunk])
        outs.append(lp.detach())
        grads_h.append(h32.grad)
    return torch.cat(outs), torch.cat(grads_h), weight32.grad


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("weight_grad", [True, False])  # False: the hidden gradient is formed in forward
def test_linear_log_probs_gpu(triton_mode, dtype, cap, weight_grad):
    """Qwen2.5-1.5B's lm_head (H 1536, V 151936) over 8192 tokens against the float32 reference on the same values.

    bf16: the kernel sees bf16-rounded logits (as the decoder does), so log-probs are within 0.05 (mean 5e-3) and
    gradients within 2% relative norm (seen on an H100: 7.7e-3, 7.7e-4, 2.4e-3); float32: 2e-5 (mean 2e-6) and
    2e-5 (seen: 1.9e-6, 2.3e-7, 2.2e-6; summation order over 151936 logits differs).
    """
    n, h, v = 8192, 1536, 151936
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=gen) * 0.02).to(dtype).requires_grad_(weight_grad)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[::7] = IGNORE_INDEX
    grad = torch.randn(n, device="cuda", generator=gen)
    out = linear_log_probs(hidden, weight, targets, cap)
    assert _is_ours(out)
    out.backward(grad)
    ref, ref_h, ref_w = _reference_in_chunks(hidden, weight, targets, grad, cap)
    err = (out - ref).abs()
    max_err, mean_err, grad_tol = (0.05, 5e-3, 2e-2) if dtype == torch.bfloat16 else (2e-5, 2e-6, 2e-5)
    assert err.max().item() < max_err and err.mean().item() < mean_err, (err.max().item(), err.mean().item())
    assert _rel(hidden.grad, ref_h) < grad_tol
    if weight_grad:
        assert _rel(weight.grad, ref_w) < grad_tol
    else:
        assert weight.grad is None


@needs_gpu
@pytest.mark.parametrize("weight_grad", [False, True])
def test_linear_cross_entropy_gpu_memory(triton_mode, weight_grad):
    """Peak memory of forward + backward stays far below the N x V float32 logits (25% of them), plus the
    weight's own gradient (a float32 accumulator and the bf16 result, V x H x 6 bytes) when it trains."""
    n, h, v = 8192, 1536, 151936
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(n, h, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=gen) * 0.02).bfloat16().requires_grad_(weight_grad)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, count = linear_cross_entropy(hidden, weight, targets, softcap=30.0)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    limit = 0.25 * n * v * 4 + (v * h * 6 if weight_grad else 0)
    assert peak < limit, f"peak {peak / 2**20:.0f} MiB over {limit / 2**20:.0f} MiB"
    assert count.item() == n and torch.isfinite(loss)
    out, _ = forward_backward(lambda hh: linear_log_probs(hh, weight.detach(), targets[:64], 30.0), [hidden[:64]])
    ref = linear_log_probs_ref(hidden[:64].float(), weight.float(), targets[:64], 30.0)
    torch.testing.assert_close(out[0], ref.detach(), atol=0.05, rtol=0.01)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ring, chunk", [(4, None), (1, 3000)])
def test_head_streamed_from_host_gpu(triton_mode, dtype, ring, chunk):
    """Qwen2.5-1.5B's head (V 151936, H 1536) in pinned host memory, streamed through a ring of `ring` 32 MB device
    buffers (HeadStream), over 8192 tokens in one chunk or chunks of 3000 (the head read three times), with
    softcap 30, against the float32 reference on the same values. Tolerances as test_linear_log_probs_gpu's (bf16:
    log-probs within 0.05, mean 5e-3, hidden gradient within 2% relative norm; float32: 2e-5, 2e-6, 2e-5).
    The peak stays below the head's size: the whole head is never on the GPU."""
    from gazelle.models.host_embeddings import HeadStream

    n, h, v = 8192, 1536, 151936
    gen = torch.Generator(device="cuda").manual_seed(2)
    hidden = torch.randn(n, h, device="cuda", generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=gen) * 0.02).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[::7] = IGNORE_INDEX
    grad = torch.randn(n, device="cuda", generator=gen)
    host = weight.cpu().pin_memory()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    stream = HeadStream(host, hidden.device, torch.cuda.Stream(), ring * lce.SLICE_BYTES)
    out = linear_log_probs(hidden, stream, targets, 30.0, chunk_tokens=chunk)
    assert _is_ours(out, "StreamedLogProbs")
    out.backward(grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < weight.nbytes, f"peak {peak / 2**20:.0f} MiB, the head is {weight.nbytes / 2**20:.0f} MiB"
    ref, ref_h, _ = _reference_in_chunks(hidden, weight, targets, grad, 30.0)
    err = (out - ref).abs()
    max_err, mean_err, grad_tol = (0.05, 5e-3, 2e-2) if dtype == torch.bfloat16 else (2e-5, 2e-6, 2e-5)
    assert err.max().item() < max_err and err.mean().item() < mean_err, (err.max().item(), err.mean().item())
    assert _rel(hidden.grad, ref_h) < grad_tol
