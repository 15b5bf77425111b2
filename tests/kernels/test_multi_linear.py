"""multi_linear and glu_linear (gazelle.kernels.multi_linear) against their references: separate F.linear calls.

CPU: the kernel in Triton's interpreter on small odd shapes (M = 1, 3, 17; K = 96, 160; weights of 48, 16 and
16 rows, with and without biases; forced K splits), float32 within TOLERANCE[float32] and float16 against the
float32 reference within TOLERANCE[float16]. bfloat16 only on the GPU: Triton 3.9's interpreter multiplies
bfloat16 tiles as their uint16 bit patterns (InterpreterBuilder.create_dot passes the raw data to np.matmul).
Weights are scaled by 1/sqrt(K), so outputs are O(1) and the tolerances mean what they say.
GPU (@needs_gpu): llama-3-8B and qwen2.5-1.5B qkv and gate/up at M = 1, 32, 64 in bfloat16 against the
float32 reference within TOLERANCE[bfloat16] elementwise (rounding y to bf16 alone is 2^-9 relative) and a
relative Frobenius error < 1e-2; float32 at 1e-5; and the ops in a torch.compile'd step captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from gazelle.kernels import dispatch
from gazelle.kernels import multi_linear as ML
from gazelle.kernels.glu import ACTS
from tests.kernels.check import TOLERANCE, assert_matches, needs_gpu, needs_interpreter

TORCH_ACTS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}


@pytest.fixture
def launches(monkeypatch):
    """The configs of the kernel's launches, so a test cannot pass on the reference alone."""
    calls = []
    launch = ML.multi_linear_fused

    def spy(x2, weights, biases, act=None, cfg=None):
        calls.append(ML.config(x2.shape[0], [w.shape[0] for w in weights], x2.shape[1], x2.device, act is not None,
                               x2.dtype) | (cfg or {}))
        return launch(x2, weights, biases, act, cfg)

    monkeypatch.setattr(ML, "multi_linear_fused", spy)
    return calls


def linears(ns, k, bias=None, seed=0, device="cpu", dtype=torch.float32):
    """Weights (n, k) ~ N(0, 1/k) and biases (n,) ~ N(0, 1) (None for every second one when bias == "some")."""
    gen = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype) for n in ns]
    bs = [torch.randn(n, generator=gen).to(device, dtype) if bias == "all" or (bias == "some" and i % 2 == 0)
          else None for i, n in enumerate(ns)]
    return ws, bs


def rows(m, k, seed=1, device="cpu", dtype=torch.float32):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def multi(n):
    """multi_linear over n weights and n biases as separate arguments (for assert_matches' dtype casts)."""
    return lambda x, *wb: ML.multi_linear(x, wb[:n], wb[n:])


def multi_ref(n):
    return lambda x, *wb: ML.multi_linear_ref(x, wb[:n], wb[n:])


# ------------------------------------------------------------------------------------------------ references


def test_multi_linear_ref_is_separate_linears():
    ws, bs = linears((5, 3, 7), 11, bias="some")
    x = rows(2, 11).view(1, 2, 11)
    bs[0] = bs[0].double()  # a bias in another dtype is cast to x's
    ref = torch.cat([F.linear(x, ws[0], bs[0].float()), F.linear(x, ws[1]), F.linear(x, ws[2], bs[2])], -1)
    assert torch.equal(ML.multi_linear_ref(x, ws, bs), ref)
    assert torch.equal(ML.multi_linear_ref(x, ws), torch.cat([F.linear(x, w) for w in ws], -1))


@pytest.mark.parametrize("act", list(ACTS))
def test_glu_linear_ref_is_glu_of_linears(act):
    (g, u), _ = linears((9, 9), 13)
    x = rows(4, 13)
    torch.testing.assert_close(ML.glu_linear_ref(x, g, u, act), TORCH_ACTS[act](x @ g.T) * (x @ u.T),
                               atol=1e-6, rtol=1e-6)


def test_reference_is_differentiable_and_chosen_for_gradients(triton_mode, launches):
    """x or a weight requiring grad takes the reference (the kernel is inference only): gradients flow."""
    ws, bs = linears((6, 4), 10, bias="all")
    x = rows(3, 10).requires_grad_()
    ML.multi_linear(x, ws, bs).sum().backward()
    torch.testing.assert_close(x.grad, (ws[0].sum(0) + ws[1].sum(0)).expand(3, 10))
    g = ws[0].clone().requires_grad_()
    ML.glu_linear(x.detach(), g, ws[0], "silu").sum().backward()
    assert g.grad is not None and not launches
    with torch.no_grad():  # no gradient wanted: the kernel (interpreter) or the reference (no interpreter)
        ML.multi_linear(x, ws, bs)
    assert len(launches) == (1 if dispatch.interpreting() else 0)


def test_invalid_arguments():
    ws, bs = linears((4, 4), 8)
    x = rows(2, 8)
    with pytest.raises(ValueError, match="1 to 4 weights"):
        ML.multi_linear(x, ws * 3)
    with pytest.raises(ValueError, match="1 to 4 weights"):
        ML.multi_linear(x, [])
    with pytest.raises(ValueError, match="biases"):
        ML.multi_linear(x, ws, bs[:1])
    with pytest.raises(ValueError, match=r"\(N_i, K\)"):
        ML.multi_linear(x, [ws[0], ws[1][:, :7]])
    with pytest.raises(ValueError, match="cast x"):
        ML.multi_linear(x.double(), ws)
    with pytest.raises(ValueError, match="bias 1"):
        ML.multi_linear(x, ws, [None, torch.zeros(3)])
    with pytest.raises(ValueError, match="differ in shape"):
        ML.glu_linear(x, ws[0], ws[1][:3], "silu")
    with pytest.raises(ValueError, match="unknown activation"):
        ML.glu_linear(x, ws[0], ws[1], "relu")


def test_reference_paths_by_design(monkeypatch, launches, kernel_log):
    """GAZELLE_KERNELS=ref, CPU tensors in auto mode and M > MAX_M take the reference, none of them logged."""
    ws, bs = linears((48, 16), 32, bias="some")
    for mode, m in (("ref", 3), ("auto", 3), ("triton", ML.MAX_M + 1)):
        monkeypatch.setenv("GAZELLE_KERNELS", mode)
        x = rows(m, 32)
        assert torch.equal(ML.multi_linear(x, ws, bs), ML.multi_linear_ref(x, ws, bs))
        assert torch.equal(ML.glu_linear(x, ws[1], ws[1], "gelu"), ML.glu_linear_ref(x, ws[1], ws[1], "gelu"))
    assert not launches and kernel_log == []


# ------------------------------------------------------------------------------------------------ CPU: the kernel


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [None, "all", "some"])
@pytest.mark.parametrize("k", [96, 160])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_multi_linear_matches_reference(triton_mode, launches, m, k, bias, dtype):
    ws, bs = linears((48, 16, 16), k, bias=bias, seed=m + k, dtype=dtype)
    x = rows(m, k, dtype=dtype)
    y = ML.multi_linear(x, ws, bs)
    assert y.shape == (m, 80) and y.dtype == dtype and len(launches) == 1
    assert_matches(multi(3), multi_ref(3), [x, *ws, *bs], dtype=dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("act", list(ACTS))
def test_glu_linear_matches_reference(triton_mode, launches, act, m, dtype):
    (g, u), _ = linears((40, 40), 160, seed=m, dtype=dtype)
    x = rows(m, 160, dtype=dtype) * 3  # gate values over the activations' bends (~N(0, 9))
    y = ML.glu_linear(x, g, u, act)
    assert y.shape == (m, 40) and y.dtype == dtype and len(launches) == 1
    assert_matches(lambda *a: ML.glu_linear(*a, act), lambda *a: ML.glu_linear_ref(*a, act), [x, g, u],
                   dtype=dtype)


@needs_interpreter
@pytest.mark.parametrize("cfg", [
    {"BK": 32, "split": 3},              # K split, the last iteration of a row masked for K = 96 and 160
    {"BN": 16, "BK": 64, "split": 2},    # narrow tiles: the 48-row weight spans three
    {"BN": 32, "BK": 16, "split": 16},   # more splits asked than iterations: one iteration each
    {"BN": 64, "BK": 128, "split": 1},   # one tile per weight, K in one iteration (96: masked)
])
@pytest.mark.parametrize("k", [96, 160])
def test_kernel_configs(cfg, k):
    """Tiles, K splits (partials added by each tile's last program) for both ops; the split-K counters back
    at zero after each call (the second call would read stale counts otherwise)."""
    ws, bs = linears((48, 16, 16), k, bias="some", seed=k)
    x = rows(17, k)
    atol, rtol = TOLERANCE[torch.float32]
    for _ in range(2):
        torch.testing.assert_close(ML.multi_linear_fused(x, ws, bs, None, cfg), ML.multi_linear_ref(x, ws, bs),
                                   atol=atol, rtol=rtol)
        torch.testing.assert_close(ML.multi_linear_fused(x, ws[1:], [None, None], "gelu_tanh", cfg),
                                   ML.glu_linear_ref(x, ws[1], ws[2], "gelu_tanh"), atol=atol, rtol=rtol)
    assert not ML.split_counters(x.device, 1).any()


@needs_interpreter
def test_shapes_and_weight_counts(triton_mode, launches):
    """Leading dims, x strided along K, one and four weights, weights shorter than a tile, a float64 bias (cast
    to x's dtype, as the reference does)."""
    atol, rtol = TOLERANCE[torch.float32]
    x = rows(6, 2 * 64).view(2, 3, 128)[..., ::2]  # (2, 3, 64), stride 2 along K
    ws, bs = linears((33, 5, 64, 17), 64, bias="some")
    bs[2] = torch.randn(64, dtype=torch.float64)
    for n in (1, 4):
        y = ML.multi_linear(x, ws[:n], bs[:n])
        assert y.shape == (2, 3, sum(w.shape[0] for w in ws[:n]))
        torch.testing.assert_close(y, ML.multi_linear_ref(x, ws[:n], bs[:n]), atol=atol, rtol=rtol)
    y = ML.glu_linear(x, ws[1], ws[1] * 2, "silu")
    assert y.shape == (2, 3, 5)
    torch.testing.assert_close(y, ML.glu_linear_ref(x, ws[1], ws[1] * 2, "silu"), atol=atol, rtol=rtol)
    assert len(launches) == 3


@needs_interpreter
def test_fallbacks_logged_once(triton_mode, launches, kernel_log):
    """float64, or a weight that is not contiguous (a copy would cost what the kernel saves): the reference,
    logged once per op."""
    ws, _ = linears((8, 8), 16, dtype=torch.float64)
    x = rows(2, 16, dtype=torch.float64)
    for _ in range(2):
        assert torch.equal(ML.multi_linear(x, ws), ML.multi_linear_ref(x, ws))
    ws, _ = linears((8, 16), 8)
    x, w_t = rows(2, 16), ws[1].T  # (16, 8) -> its transpose (8, 16) is strided
    for _ in range(2):
        assert torch.equal(ML.glu_linear(x, w_t, w_t, "silu"), ML.glu_linear_ref(x, w_t, w_t, "silu"))
    assert not launches
    assert len(kernel_log) == 2 and "float64" in kernel_log[0] and "contiguous" in kernel_log[1], kernel_log


# ------------------------------------------------------------------------------------------------ custom ops


def test_custom_ops_opcheck(triton_mode):
    """Schemas (Tensor[] weights, Tensor?[] biases), fake implementations, and tracing through AOT dispatch with
    dynamic shapes (torch.library.opcheck), on the kernel under the interpreter or else the reference."""
    ws, bs = linears((24, 8, 8), 32, bias="some")
    x = rows(3, 32)
    torch.library.opcheck(torch.ops.gazelle.multi_linear.default, (x, ws, bs))
    torch.library.opcheck(torch.ops.gazelle.glu_linear.default, (x.view(1, 3, 32), ws[1], ws[2], "gelu"))


def test_compiled_ops_cpu(triton_mode, launches):
    """Both ops stay single opaque calls in a torch.compile'd (fullgraph) step, and the kernel runs when the
    graph does. Backend aot_eager: dynamo and AOTAutograd trace the ops' fake implementations as inductor would,
    without inductor's C++ code generation (tens of seconds on 2 CPU cores) that this test does not need."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    ws, bs = linears((24, 8, 8), 32, bias="all")

    @torch.compile(backend=backend, fullgraph=True)
    def step(x):
        qkv = ML.multi_linear(x * 2, ws, bs)
        return qkv, ML.glu_linear(x, ws[1], ws[2], "silu") + 1

    x = rows(5, 32)
    qkv, h = step(x)
    assert {torch.ops.gazelle.multi_linear, torch.ops.gazelle.glu_linear} <= set(targets), targets
    atol, rtol = TOLERANCE[torch.float32]
    torch.testing.assert_close(qkv, ML.multi_linear_ref(x * 2, ws, bs), atol=atol, rtol=rtol)
    torch.testing.assert_close(h, ML.glu_linear_ref(x, ws[1], ws[2], "silu") + 1, atol=atol, rtol=rtol)
    assert len(launches) == (2 if dispatch.interpreting() else 0)


@needs_interpreter
def test_benchmark_sweep_configs_run():
    """Every config benchmarks/multi_linear.py sweeps runs in the kernel (interpreter, tiny shapes)."""
    from benchmarks.multi_linear import dry_run

    dry_run(wide=False)  # the default sweep (--dry-run on the command line: the wide one)


# ------------------------------------------------------------------------------------------------ GPU

GPU_GROUPS = {  # name: (weight rows, K, bias, glu)
    "qkv 8b": ((4096, 1024, 1024), 4096, False, False),
    "gate/up 8b": ((14336, 14336), 4096, False, True),
    "qkv 1.5b": ((1536, 256, 256), 1536, True, False),
    "gate/up 1.5b": ((8960, 8960), 1536, False, True),
}


@functools.cache
def gpu_linears(name, dtype):
    ns, k, bias, _ = GPU_GROUPS[name]
    return linears(ns, k, bias="all" if bias else None, seed=k + len(ns), device="cuda", dtype=dtype)


def gpu_case(name, m, dtype=torch.bfloat16):
    """(the op, its float32 reference) as thunks, for the group `name` and x of m rows."""
    _, k, _, glu = GPU_GROUPS[name]
    ws, bs = gpu_linears(name, dtype)
    x = rows(m, k, device="cuda", dtype=dtype)
    if glu:
        return (lambda: ML.glu_linear(x, *ws, "silu"),
                lambda: ML.glu_linear_ref(x.float(), ws[0].float(), ws[1].float(), "silu"))
    return (lambda: ML.multi_linear(x, ws, bs),
            lambda: ML.multi_linear_ref(x.float(), [w.float() for w in ws], [b if b is None else b.float()
                                                                             for b in bs]))


@needs_gpu
@pytest.mark.parametrize("m", [1, 32, 64])
@pytest.mark.parametrize("name", list(GPU_GROUPS))
def test_gpu_bf16(monkeypatch, launches, name, m):
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    fast, ref = gpu_case(name, m)
    y, y_ref = fast(), ref()
    assert len(launches) == 1 and y.dtype == torch.bfloat16 and y.shape == y_ref.shape
    atol, rtol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(y.float(), y_ref, atol=atol, rtol=rtol)
    assert rel_err(y, y_ref) < 1e-2
    assert torch.equal(fast(), y)  # deterministic: the split partials are added in a fixed order


@needs_gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("name", ["qkv 1.5b", "gate/up 1.5b"])
def test_gpu_other_dtypes(monkeypatch, name, dtype, tol):
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    fast, ref = gpu_case(name, 32, dtype)
    assert rel_err(fast(), ref()) < tol


@needs_gpu
@pytest.mark.parametrize("m", [1, 64])
def test_gpu_compiled_cuda_graph(monkeypatch, launches, m):
    """Both ops in a torch.compile'd step captured in a CUDA graph (split-K counters and partials included);
    new rows of x written in place, then replays equal the eager ops."""
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    ws, bs = linears((1536, 256, 256), 1536, bias="all", device="cuda", dtype=torch.bfloat16)
    (g, u), _ = linears((8960, 8960), 1536, seed=1, device="cuda", dtype=torch.bfloat16)
    x = rows(m, 1536, device="cuda", dtype=torch.bfloat16)

    @torch.compile(fullgraph=True)
    def step(x):
        h = x * 2
        return ML.multi_linear(h, ws, bs), ML.glu_linear(h, g, u, "silu")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():  # compile, JIT and make the counters before the capture
        for _ in range(2):
            step(x)
    torch.cuda.current_stream().wait_stream(side)
    assert launches
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side), torch.no_grad():
        qkv, h = step(x)
    calls = len(launches)
    for seed in (2, 3):
        x.copy_(rows(m, 1536, seed=seed, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(qkv, ML.multi_linear(x * 2, ws, bs))
        assert torch.equal(h, ML.glu_linear(x * 2, g, u, "silu"))
    assert len(launches) == calls + 4  # the eager checks; replays launch from the graph

