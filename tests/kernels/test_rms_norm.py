"""Triton RMSNorm against its reference (the decoder's rms_norm): forward, dx and dweight, both norm forms."""

from __future__ import annotations

import pytest
import torch

from gazelle.kernels.rms_norm import rms_norm, rms_norm_ref
from gazelle.models.decoder import rms_norm as decoder_rms_norm
from tests.kernels.check import assert_matches, needs_gpu, needs_interpreter

EPS = 1e-6


def _inputs(shape, offset, dtype=torch.float32, device="cpu", seed=0, weight_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2 + 0.3).to(device=device, dtype=dtype).requires_grad_()
    centre = 0.0 if offset else 1.0
    w = (centre + 0.2 * torch.randn(shape[-1], generator=gen)).to(device, weight_dtype or dtype).requires_grad_()
    return [x, w, EPS, offset]


def _grad_fn_name(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__


def test_reference_is_the_decoder_norm():
    for offset in (0.0, 1.0):
        x, w, eps, _ = _inputs((3, 7, 33), offset, dtype=torch.bfloat16)
        assert torch.equal(rms_norm_ref(x, w, eps, offset), decoder_rms_norm(x, w, eps, offset))


@needs_interpreter
@pytest.mark.parametrize("shape, offset", [
    ((3, 5, 67), 0.0),     # odd rows and hidden, llama form
    ((4, 129), 0.0),       # hidden just past a power of two
    ((2, 3, 129), 1.0),    # gemma form: (1 + w)
    ((300, 67), 0.0),      # several row blocks per backward program: the looped dweight partial sums
    ((300, 67), 1.0),
    ((5, 16), 0.5),        # a tile of many rows, a non-unit offset
])
def test_matches_reference_cpu(triton_mode, shape, offset):
    inputs = _inputs(shape, offset)
    y, ref = rms_norm(*inputs), rms_norm_ref(*inputs)
    assert _grad_fn_name(y).startswith("_RMSNormFunction")  # the kernel ran, not a fallback
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert_matches(rms_norm, rms_norm_ref, inputs)


@needs_interpreter
def test_float32_forward_within_rounding(triton_mode):
    """Only the order of the sum of squares differs from the reference: a few float32 ulps at most."""
    x, w, eps, _ = _inputs((6, 67), 0.0)
    y, ref = rms_norm(x, w, eps), rms_norm_ref(x, w, eps)
    torch.testing.assert_close(y, ref, atol=0, rtol=4 * torch.finfo(torch.float32).eps)


@needs_interpreter
def test_strided_input_and_frozen_weight(triton_mode):
    """A transposed (non-contiguous) x; a weight without grad gets none and its partial sums are skipped."""
    x, w, eps, _ = _inputs((3, 5, 67), 0.0)
    w = w.detach()
    x_t = x.detach().transpose(0, 1).requires_grad_()  # (5, 3, 67), leading dims permuted
    x_cols = torch.randn(67, 6).t().requires_grad_()  # (6, 67) with the hidden dim strided
    for xs in (x_t, x_cols):
        assert not xs.is_contiguous()
        assert_matches(rms_norm, rms_norm_ref, [xs, w, eps, 0.0])
    y = rms_norm(x_t, w, eps)
    (gx,) = torch.autograd.grad(y.sum(), [x_t])
    assert gx.shape == x_t.shape


@needs_interpreter
def test_weight_grad_deterministic(triton_mode):
    x, w, eps, offset = _inputs((300, 67), 1.0)
    grads = [torch.autograd.grad(rms_norm(x, w, eps, offset).square().sum(), [w])[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_dispatch_ref_mode(monkeypatch):
    monkeypatch.setenv("GAZELLE_KERNELS", "ref")
    x, w, eps, offset = _inputs((3, 5, 67), 0.0)
    y = rms_norm(x, w, eps, offset)
    assert not _grad_fn_name(y).startswith("_RMSNormFunction")
    assert torch.equal(y, rms_norm_ref(x, w, eps, offset))


@needs_interpreter
def test_fallbacks(triton_mode):
    """float64 (the reference computes it in float32) and a float64 weight run the reference."""
    for inputs in (_inputs((3, 67), 0.0, dtype=torch.float64),
                   _inputs((3, 67), 0.0, weight_dtype=torch.float64)):
        y = rms_norm(*inputs)
        assert not _grad_fn_name(y).startswith("_RMSNormFunction")
        assert torch.equal(y, rms_norm_ref(*inputs))


# ---- GPU: realistic shapes, compiled kernels ----

GPU_SHAPES = [(4096, 4096), (2, 2048, 1536)]


@needs_gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_gpu(monkeypatch, shape, offset, dtype):
    """Forward, dx and dweight against the float32 reference (TOLERANCE: fp32 1e-5, bf16 2e-2, atol and rtol)."""
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    inputs = _inputs(shape, offset, dtype=dtype, device="cuda")
    assert _grad_fn_name(rms_norm(*inputs)).startswith("_RMSNormFunction")
    # dweight sums 4096 rows of magnitude-1 products: an absolute tolerance scaled by sqrt(rows) for it
    rows = inputs[0].numel() // shape[-1]
    atol, rtol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    assert_matches(rms_norm, rms_norm_ref, inputs, tol=(atol * max(1.0, rows ** 0.5 / 8), rtol))


@needs_gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_bf16_forward_matches_reference_rounding(monkeypatch, shape, offset):
    """In bf16 the kernel rounds where the reference rounds: outputs equal the bf16 reference except where the
    float32 rstd differs in its last bits (sum order, rsqrt) and flips a rounding: at most 1% of elements,
    each within two bf16 ulps."""
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    x, w, eps, _ = _inputs(shape, offset, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        y, ref = rms_norm(x, w, eps, offset), rms_norm_ref(x, w, eps, offset)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert (y != ref).float().mean().item() < 0.01
    torch.testing.assert_close(y, ref, atol=0, rtol=2 * 2**-7)


@needs_gpu
def test_mixed_dtypes_gpu(monkeypatch):
    """bf16 x with a float32 weight (llama form) gives a float32 output, as the reference's promotion does."""
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    inputs = _inputs((2, 2048, 1536), 0.0, dtype=torch.bfloat16, device="cuda", weight_dtype=torch.float32)
    y = rms_norm(*inputs)
    assert y.dtype == torch.float32
    assert_matches(rms_norm, rms_norm_ref, inputs, dtype=torch.bfloat16)
