"""Grouped NF4 products (gazelle.kernels.nf4.nf4_multi_linear, nf4_glu_linear) against the reference.

The oracle is the plain-torch reference of each weight: x @ W_i^T + b_i with W_i = gazelle.quant.nf4's
dequantization in x's dtype, concatenated (multi) or through glu_ref (glu). Tolerances as in test_nf4.py: float32
on the CPU (Triton's interpreter) atol 1e-4, rtol 1e-5 (only the order of float32 sums differs); bf16 on the GPU
||y - ref|| / ||ref|| < 1e-2 against float32 products with the float32 dequantized weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gazelle.kernels import nf4 as K
from gazelle.kernels.glu import ACTS, glu_ref
from gazelle.quant.nf4 import dequantize_nf4
from tests.kernels.check import needs_gpu, needs_interpreter
from tests.kernels.test_nf4 import FP32_TOL, gpu_weight, reference, rel_err, weight


def multi_ref(x, qs, biases):
    return torch.cat([reference(x, q, b) for q, b in zip(qs, biases)], -1)


def glu_linear_ref(x, g, u, act):
    return glu_ref(reference(x, g), reference(x, u), act)


def close(y, ref):
    torch.testing.assert_close(y, ref, atol=FP32_TOL[0], rtol=FP32_TOL[1])


@pytest.fixture
def launches(monkeypatch):
    """Calls of the fused launcher, by the number of weights each one covered."""
    calls = []
    fused = K.nf4_grouped_fused

    def spy(x2, qs, *args, **kwargs):
        calls.append(len(qs))
        return fused(x2, qs, *args, **kwargs)

    monkeypatch.setattr(K, "nf4_grouped_fused", spy)
    return calls


# --------------------------------------------------------------------------------------------- CPU: interpreter


@needs_interpreter
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("m", [1, 5, 17])  # GEMV, tl.dot with one and two x tiles of 16
def test_multi_linear_matches_reference(triton_mode, launches, m, double_quant):
    """q/k/v-like: rows 48, 16 and 24 (tiles of 64 straddle nothing: each weight has its own), bias on two."""
    qs = [weight(n, 128, double_quant=double_quant, seed=n) for n in (48, 16, 24)]
    biases = [torch.randn(48), None, torch.randn(24)]
    x = torch.randn(m, 128)
    y = K.nf4_multi_linear(x, qs, biases)
    assert y.shape == (m, 88) and launches == [3]
    close(y, multi_ref(x, qs, biases))


@needs_interpreter
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("m", [1, 6])
def test_glu_linear_matches_reference(triton_mode, launches, m, act):
    g, u = weight(40, 192, seed=1), weight(40, 192, seed=2)
    x = torch.randn(2, m, 192)  # leading dimensions
    y = K.nf4_glu_linear(x, g, u, act)
    assert y.shape == (2, m, 40) and launches == [2]
    close(y, glu_linear_ref(x, g, u, act))


@needs_interpreter
@pytest.mark.parametrize("config", [
    {"BN": 16, "NC": 2, "split": 3},  # ragged last tiles of each weight, partials summed by each tile's last program
    {"BN": 8, "NC": 4, "split": 2},   # GEMV tiles (m = 1), split
    {"BN": 16, "NC": 1},              # no split, several iterations a row
])
def test_grouped_configs(config):
    """Tiles, K splits (the up partials beside the gate's) and both forms, each call twice (counters back at 0)."""
    qs = [weight(n, 256, seed=n) for n in (37, 9, 9)]
    biases = [torch.randn(37), torch.randn(9), torch.randn(9)]
    g, u = weight(21, 256, seed=3), weight(21, 256, seed=4)
    for m in (1, 5):
        cfg = dict(config, BM=1 if m == 1 else 16)
        if m > 1 and cfg["BN"] < 16:
            cfg["BN"] = 16
        x = torch.randn(m, 256)
        for _ in range(2):
            close(K.nf4_grouped_fused(x, qs, biases, None, cfg), multi_ref(x, qs, biases))
            close(K.nf4_grouped_fused(x, [g, u], [None, None], "silu", cfg), glu_linear_ref(x, g, u, "silu"))


@needs_interpreter
def test_one_weight_equals_nf4_linear(triton_mode):
    """A group of one is nf4_linear's own launch: the same kernel and tiles, so the same bits."""
    q, bias = weight(33, 128, seed=5), torch.randn(33)
    x = torch.randn(3, 128)
    assert torch.equal(K.nf4_multi_linear(x, [q], [bias]), K.nf4_linear(x, q, bias))


# --------------------------------------------------------------------------------------------- where it does not run


@needs_interpreter
def test_gradients_go_through_nf4_linear(triton_mode, launches):
    """With a gradient needed the grouped launch stands aside; each weight's nf4_linear carries it."""
    qs = [weight(n, 64, seed=n) for n in (24, 8)]
    x = torch.randn(3, 64, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    y = K.nf4_multi_linear(x, qs, [None, bias])
    assert launches == [1, 1]  # nf4_linear, once a weight
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    multi_ref(x_ref, qs, [None, bias_ref]).backward(grad_y)
    close(x.grad, x_ref.grad)
    close(bias.grad, bias_ref.grad)


@needs_interpreter
def test_prefill_sized_inputs_run_per_weight(triton_mode, launches):
    g, u = weight(16, 64, seed=1), weight(16, 64, seed=2)
    x = torch.randn(K.FUSED_MAX_M + 1, 64)
    close(K.nf4_glu_linear(x, g, u, "gelu_tanh"), glu_linear_ref(x, g, u, "gelu_tanh"))
    assert launches == []  # dequantize + cuBLAS (F.linear) for each weight


@needs_interpreter
def test_mixed_quantization_falls_back_logged(triton_mode, launches, kernel_log):
    qs = [weight(16, 128, blocksize=64), weight(16, 128, blocksize=32)]
    x = torch.randn(2, 128)
    for _ in range(2):
        close(K.nf4_multi_linear(x, qs), multi_ref(x, qs, [None, None]))
    assert launches == [1, 1, 1, 1]  # each weight alone
    assert len(kernel_log) == 1 and "blocksize" in kernel_log[0], kernel_log


def test_reference_mode(monkeypatch, launches):
    monkeypatch.setenv("GAZELLE_KERNELS", "ref")
    qs = [weight(n, 64, seed=n) for n in (8, 4)]
    up = weight(8, 64, seed=9)
    x = torch.randn(2, 64)
    assert torch.equal(K.nf4_multi_linear(x, qs), multi_ref(x, qs, [None, None]))
    assert torch.equal(K.nf4_glu_linear(x, qs[0], up, "silu"), glu_linear_ref(x, qs[0], up, "silu"))
    assert launches == []


def test_bad_arguments_name_what_is_wrong():
    q, x = weight(8, 64), torch.randn(2, 64)
    with pytest.raises(ValueError, match="1 to 3 weights"):
        K.nf4_multi_linear(x, [q] * 4)
    with pytest.raises(ValueError, match="weight 1 .* does not match x"):
        K.nf4_multi_linear(x, [q, weight(8, 128)])
    with pytest.raises(ValueError, match="bias 0"):
        K.nf4_multi_linear(x, [q], [torch.randn(3)])
    with pytest.raises(ValueError, match="differ in shape"):
        K.nf4_glu_linear(x, q, weight(4, 64), "silu")
    with pytest.raises(ValueError, match="unknown activation"):
        K.nf4_glu_linear(x, q, q, "relu")


# --------------------------------------------------------------------------------------------- GPU

GROUPS = {  # name: rows of each weight, K
    "qkv 1.5b": ((1536, 256, 256), 1536),
    "qkv 8b": ((4096, 1024, 1024), 4096),
}
GLUS = {"gate/up 1.5b": (8960, 1536), "gate/up 8b": (14336, 4096)}


@needs_gpu
@pytest.mark.parametrize("m", [1, 8, 32, 64])
@pytest.mark.parametrize("name", list(GROUPS))
def test_gpu_multi_linear_bf16(name, m):
    ns, k = GROUPS[name]
    pairs = [gpu_weight(n, k) for n in ns]
    biases = [torch.randn(n, device="cuda").to(torch.bfloat16) for n in ns]
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    y = K.nf4_multi_linear(x, [q for q, _ in pairs], biases)
    ref = torch.cat([F.linear(x.float(), w32, b.float()) for (_, w32), b in zip(pairs, biases)], -1)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 1e-2


@needs_gpu
@pytest.mark.parametrize("m", [1, 8, 32, 64])
@pytest.mark.parametrize("name", list(GLUS))
def test_gpu_glu_linear_bf16(name, m):
    n, k = GLUS[name]
    g, g32 = gpu_weight(n, k)
    u = weight(n, k, seed=n + k + 1, device="cuda")
    u32 = dequantize_nf4(u, torch.float32)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    y = K.nf4_glu_linear(x, g, u, "silu")
    ref = glu_ref(x.float() @ g32.T, x.float() @ u32.T, "silu")
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 1e-2
    y32 = K.nf4_glu_linear(x.float(), g, u, "silu")
    assert rel_err(y32, ref) < 1e-5


@needs_gpu
@pytest.mark.parametrize("m", [1, 32])
def test_gpu_grouped_cuda_graph(m):
    """Captured in a CUDA graph, replays equal eager and eager is deterministic (split partials in fixed order)."""
    ns, k = GROUPS["qkv 1.5b"]
    qs = [gpu_weight(n, k)[0] for n in ns]
    g, u = gpu_weight(*GLUS["gate/up 1.5b"])[0], weight(*GLUS["gate/up 1.5b"], seed=1, device="cuda")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)

    def step():
        return K.nf4_multi_linear(x, qs), K.nf4_glu_linear(x, g, u, "silu")

    eager = step()
    assert all(torch.equal(a, b) for a, b in zip(step(), eager))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on the capture stream: its counters exist before the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = step()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(out, eager))
