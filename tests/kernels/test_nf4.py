"""NF4 Triton kernels (gazelle.kernels.nf4) against the plain-torch reference.

CPU tests run the kernels in Triton's interpreter on small odd shapes, in float32 (float16 too for the
dequantize kernel: the interpreter's float32 -> float16 cast rounds to nearest even as the GPU does; its bf16 casts
and bf16 products are not reliable, so bf16 is tested on the GPU only).
Tolerances:
- dequantize: bit for bit the reference, every dtype;
- nf4_linear, float32 (CPU): atol 1e-4, rtol 1e-5 against x @ W^T + b with the reference's W (outputs and
  gradients are ~sqrt(K) ~ 10 in size: atol is 1e-5 of that); only the order of the float32 sums differs;
- nf4_linear, bf16 (GPU): ||y - ref|| / ||ref|| < 1e-2, ref = float32 x @ W32^T (W32 the float32 dequantized
  weight), so it also counts W's rounding to bf16 (~2^-9 an element); float32 x on the GPU: < 1e-5.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from gazelle.kernels import nf4 as K
from gazelle.quant.nf4 import dequantize_nf4, quantize_nf4
from tests.kernels.check import assert_matches, needs_gpu, needs_interpreter

FP32_TOL = (1e-4, 1e-5)  # (atol, rtol) of float32 results on the CPU, see the module docstring


@pytest.fixture
def kernel_log(kernel_log, monkeypatch):
    """The shared fixture, with nf4_linear's once-per-reason memory fresh too."""
    monkeypatch.setattr(K, "_noted", set())
    return kernel_log


def weight(n: int, k: int, blocksize: int = 64, double_quant: bool = True, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return quantize_nf4(torch.randn(n, k, generator=gen).to(device), blocksize, double_quant)


def reference(x, q, bias=None):
    """x @ W^T + b with the reference's W in x's dtype: the oracle of nf4_linear (differentiable wrt x, b)."""
    return F.linear(x, dequantize_nf4(q, x.dtype), bias)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


# --------------------------------------------------------------------------------------------- CPU: dequantize


@needs_interpreter
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, blocksize", [
    ((7, 33), 64),     # odd numel: the last byte's low nibble is padding
    ((3, 101), 128),   # odd numel, a short last block
    ((130, 192), 64),  # 390 blocks: more than one nested block of 256
    ((65, 256), 128),  # 130 blocks of 128
    ((5, 64), 32),     # blocksize 32
])
def test_dequantize_bitwise(triton_mode, shape, blocksize, double_quant):
    q = weight(*shape, blocksize=blocksize, double_quant=double_quant)
    for dtype in (torch.float32, torch.float16):
        out, ref = K.dequantize_nf4(q, dtype), dequantize_nf4(q, dtype)
        assert out.dtype == dtype and out.shape == ref.shape
        assert torch.equal(bits(out), bits(ref))
        buf = torch.full(q.shape, float("nan"), dtype=dtype)  # poisoned: every element must be written
        assert K.dequantize_nf4_into(q, buf) is buf and torch.equal(bits(buf), bits(ref))
    assert K.dequantize_nf4(q).dtype == q.dtype  # the default dtype is the original weight's


# --------------------------------------------------------------------------------------------- CPU: nf4_linear


@needs_interpreter
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("n, k", [(48, 128), (40, 192)])
@pytest.mark.parametrize("m", [1, 3, 17, 70])  # GEMV, tl.dot (one and two x tiles of 16), dequantize + F.linear
def test_nf4_linear_matches_reference(triton_mode, m, n, k, has_bias):
    q = weight(n, k, double_quant=n == 48, seed=m)
    x = torch.randn(m, k).requires_grad_()
    bias = torch.randn(n).requires_grad_() if has_bias else None
    y = K.nf4_linear(x, q, bias)
    assert type(y.grad_fn).__name__.startswith("_NF4Linear") and y.shape == (m, n) and y.dtype == x.dtype
    assert_matches(K.nf4_linear, reference, [x, q, bias], tol=FP32_TOL)  # forward, grad_x and grad_bias


@needs_interpreter
@pytest.mark.parametrize("config", [
    {"split": 3},                                      # split K: partials added by the tile's last program
    {"split": 2, "NC": 2},                             # 24 words a row, 16 an iteration: a masked last iteration
    {"BM": 16, "BN": 16, "NC": 1, "split": 2},         # the tl.dot form for a single row
    {"BN": 8, "NC": 4},                                # GEMV tiles that cover the row in one iteration
])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_fused_kernel_configs(config, blocksize):
    """The fused kernel across tiles, K splits and blocksizes (a chunk is min(8, blocksize / 8) words)."""
    q = weight(37, 192 if blocksize != 128 else 256, blocksize=blocksize)
    bias = torch.randn(37)
    for m in (1, 5):
        cfg = dict(config)
        if m > 1 and cfg.get("BM", 16) < 16:
            continue
        if m > 1:
            cfg["BM"] = 16
        cfg["CW"] = min(8, blocksize // 8)
        x = torch.randn(m, q.shape[1])
        for _ in range(2):  # twice: the split-K counters must be back at zero after a call
            y = K.nf4_linear_fused(x, q, bias, cfg)
            torch.testing.assert_close(y, reference(x, q, bias), atol=FP32_TOL[0], rtol=FP32_TOL[1])


@pytest.mark.parametrize("ns, k, glu, split", [
    ((8960, 8960), 1536, True, 1),   # gate/up: 140 tiles already fill the SMs
    ((1536,), 8960, False, 8),       # down: 24 tiles, long rows (70 iterations)
    ((1536, 256, 256), 1536, False, 4),  # q/k/v: 12 iterations, at least 3 a split
    ((1536,), 1536, False, 4),       # o
])
def test_fused_config_splits_at_64_rows(ns, k, glu, split):
    """The K split at 64 rows of x on qwen-1.5B's decode groups, for the H100's 132 SMs (fused_config's rule and the
    sweep it comes from); every split keeps at least 3 iterations of the row."""
    cfg = K.fused_config(64, ns, k, 64, torch.device("cpu"), glu, sms=132)
    assert (cfg["BM"], cfg["BN"], cfg["NC"], cfg["split"]) == (64, 64, 2, split)
    assert (k // 8) // (cfg["NC"] * cfg["CW"]) >= 3 * cfg["split"]


@needs_interpreter
def test_nf4_linear_shapes(triton_mode):
    """Leading dimensions and an x strided along K; bias in another dtype than x (cast to x's, as F.linear needs)."""
    q = weight(33, 128)
    x = torch.randn(2, 3, 256)[..., ::2]  # (2, 3, 128), stride 2 along K
    bias = torch.randn(33, dtype=torch.float64)
    y = K.nf4_linear(x, q, bias)
    assert y.shape == (2, 3, 33) and y.dtype == torch.float32
    torch.testing.assert_close(y, reference(x, q, bias.float()), atol=FP32_TOL[0], rtol=FP32_TOL[1])


@needs_interpreter
def test_k_not_a_multiple_of_the_blocksize(triton_mode, kernel_log):
    """Rows that do not start on a block: the fused kernel cannot walk them; dequantize + F.linear, logged once."""
    q = weight(5, 96, blocksize=64)
    x = torch.randn(2, 96)
    for _ in range(3):
        torch.testing.assert_close(K.nf4_linear(x, q), reference(x, q), atol=FP32_TOL[0], rtol=FP32_TOL[1])
    assert len(kernel_log) == 1 and "nf4_linear" in kernel_log[0] and "multiple" in kernel_log[0], kernel_log


# --------------------------------------------------------------------------------------------- dispatch


def test_ref_mode_runs_the_reference(monkeypatch, kernel_log):
    def boom(*args, **kwargs):
        raise AssertionError("a Triton kernel ran under GAZELLE_KERNELS=ref")

    monkeypatch.setenv("GAZELLE_KERNELS", "ref")
    monkeypatch.setattr(K, "_dequantize_triton", boom)
    monkeypatch.setattr(K, "nf4_linear_fused", boom)
    q = weight(5, 64)
    x = torch.randn(2, 64, requires_grad=True)
    y = K.nf4_linear(x, q)
    assert torch.equal(y, reference(x, q))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(2, 5) @ dequantize_nf4(q, torch.float32))
    assert torch.equal(K.dequantize_nf4(q, torch.float32), dequantize_nf4(q, torch.float32))
    assert torch.equal(K.dequantize_nf4_into(q, torch.empty(5, 64)), dequantize_nf4(q, torch.float32))
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")  # CPU tensors in auto mode: the reference too, by design
    assert torch.equal(K.nf4_linear(x, q), reference(x, q))
    assert kernel_log == []  # a chosen reference is no fallback


@needs_interpreter
def test_float64_falls_back_logged_once(triton_mode, kernel_log):
    q = weight(5, 64)
    x = torch.randn(2, 64, dtype=torch.float64)
    for _ in range(3):
        assert torch.equal(K.nf4_linear(x, q), reference(x, q))
        assert torch.equal(K.dequantize_nf4(q, torch.float64), dequantize_nf4(q, torch.float64))
    assert len(kernel_log) == 2 and all("float64" in m for m in kernel_log), kernel_log


# --------------------------------------------------------------------------------------------- GPU

LAYER_SHAPES = [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960),  # qwen2.5-1.5B: q/o, k/v, gate|up, down
                (4096, 4096), (14336, 4096), (4096, 14336)]  # llama-3-8B: q/o, gate|up, down


@functools.cache
def gpu_weight(n: int, k: int, double_quant: bool = True):
    """(q, W32): an NF4 weight of a trained-like scale on the GPU and its float32 dequantization."""
    q = weight(n, k, double_quant=double_quant, seed=n + k, device="cuda")
    return q, dequantize_nf4(q, torch.float32)


@needs_gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_gpu_dequantize_bitwise(double_quant):
    q, _ = gpu_weight(8960, 1536, double_quant)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ref = dequantize_nf4(q, dtype)
        assert torch.equal(bits(K.dequantize_nf4(q, dtype)), bits(ref)), dtype
        buf = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
        assert torch.equal(bits(K.dequantize_nf4_into(q, buf)), bits(ref)), dtype


@needs_gpu
@pytest.mark.parametrize("m", [1, 8, 32, 64, 512])
@pytest.mark.parametrize("n, k", LAYER_SHAPES)
def test_gpu_nf4_linear_bf16(n, k, m):
    q, w32 = gpu_weight(n, k)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    y = K.nf4_linear(x, q, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    ref = F.linear(x.float(), w32, bias.float())
    assert rel_err(y, ref) < 1e-2
    if m == 1:  # float32 x: float32 products throughout
        y32 = K.nf4_linear(x.float(), q, bias.float())
        assert rel_err(y32, ref) < 1e-5


@needs_gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("m", [1, 32, 64])
def test_gpu_nf4_linear_other_dtypes(m, dtype, tol):
    q, w32 = gpu_weight(1536, 8960)  # narrow and deep: split K
    x = torch.randn(m, 8960, device="cuda").to(dtype)
    y = K.nf4_linear(x, q)
    assert y.dtype == dtype and rel_err(y, x.float() @ w32.T) < tol


@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 300])
def test_gpu_grad_x(m):
    q, w32 = gpu_weight(1536, 1536)
    x = torch.randn(2, m, 1536, device="cuda").to(torch.bfloat16).requires_grad_()
    bias = torch.randn(1536, device="cuda").to(torch.bfloat16).requires_grad_()
    grad_y = torch.randn(2, m, 1536, device="cuda").to(torch.bfloat16)
    K.nf4_linear(x, q, bias).backward(grad_y)
    assert x.grad.dtype == torch.bfloat16 and bias.grad.dtype == torch.bfloat16
    assert rel_err(x.grad, grad_y.float() @ w32) < 1e-2
    assert rel_err(bias.grad, grad_y.float().sum((0, 1))) < 1e-2


@needs_gpu
@pytest.mark.parametrize("m", [1, 32])
def test_gpu_cuda_graph_and_determinism(m):
    """Captured in a CUDA graph (split-K counters, workspaces and the scratch buffer included), replays equal eager."""
    q, _ = gpu_weight(1536, 8960)
    x = torch.randn(m, 8960, device="cuda").to(torch.bfloat16)
    eager = K.nf4_linear(x, q)
    assert torch.equal(K.nf4_linear(x, q), eager)  # deterministic: the split partials are added in a fixed order
    scratch = torch.empty(q.shape, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        K.nf4_linear(x, q)  # warm-up on the capture stream: its counters exist before the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = K.nf4_linear(x, q)
        K.dequantize_nf4_into(q, scratch)
    for _ in range(3):
        scratch.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)
        assert torch.equal(scratch, dequantize_nf4(q, torch.bfloat16))
