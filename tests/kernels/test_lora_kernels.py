"""Fused LoRA projections (gazelle.kernels.lora) against autograd through the LoraLinear modules themselves
(called under GAZELLE_KERNELS=ref, since LoraLinear.forward may dispatch to the fused path itself).

CPU: small odd shapes (2 x 7 tokens, hidden 24, out 40, intermediate 56, r 4, scaling 2.0) in float32 (atol =
rtol = 1e-5) and float64 (1e-10), dense and NF4 bases, with and without a trained bias; outputs, grad_x and
the gradient of every trainable parameter. GAZELLE_KERNELS=triton selects the fused path on CPU (its glu runs
in Triton's interpreter in float32, in torch math in float64). An NF4 base is float32 (NF4 quantizes 16/32-bit
weights) and, as Linear4bit does, runs in its compute_dtype float32 even for float64 activations; the fused
path reproduces that rounding, so float64 keeps its 1e-10 tolerance.
GPU (@needs_gpu): qwen2.5-1.5B and llama-3-8B shapes in bf16 against the modules in float32, relative Frobenius
error < 1e-2 for outputs and all gradients (also with the residual stream added by the o and MLP products); and
the memory lora_mlp keeps for backward against plain autograd.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gazelle.kernels import dispatch
from gazelle.kernels.lora import LoraProjection, lora_linear, lora_mlp, lora_qkv
from gazelle.lora.layers import LoraLinear
from gazelle.quant.linear4bit import Linear4bit
from tests.kernels.check import TOLERANCE, needs_gpu

LEAD, HIDDEN, OUT, INTER, R, ALPHA = (2, 7), 24, 40, 56, 4, 8.0  # scaling = ALPHA / R = 2.0
ACTS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("GAZELLE_KERNELS", "triton")


@pytest.fixture
def cpu_fused(fused):
    """The fused path on CPU tensors: it calls the GLU/NF4 kernels, which need Triton's interpreter there."""
    if not dispatch.interpreting():
        pytest.skip("CPU tensors take the fused path only under Triton's interpreter (the CPU suite)")


def make_lora(in_f: int, out_f: int, *, dtype=torch.float32, bias=False, nf4=False, r=R, alpha=ALPHA, seed=0,
              device="cpu", compute_dtype=torch.float32, train_bias=True) -> LoraLinear:
    """A LoraLinear with random non-zero A and B (init_lora_weights=False) over a frozen dense or NF4 base."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias, dtype=torch.float32 if nf4 else dtype, device=device)
    with torch.no_grad():
        if bias:
            linear.bias.normal_()  # larger than the default init so a wrong bias shows
    base = Linear4bit.from_linear(linear, compute_dtype) if nf4 else linear.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1000)
    mode = "all" if bias and train_bias else "none"
    return LoraLinear(base, r, alpha, bias_mode=mode, init_lora_weights=False, generator=gen).to(device)


def trainable(mods) -> list[torch.Tensor]:
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def run(fn, x: torch.Tensor, mods, x_grad=True, seed=0):
    """fn(x)'s outputs and the gradients of sum <output, w> wrt x and every trainable parameter; w is fixed random
    and bf16-representable, so a bf16 run and its float32 reference start backward from the same values."""
    x = x.detach().clone().requires_grad_(x_grad)
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen).bfloat16().to(o.device, o.dtype)).sum() for o in outs)
    leaves = ([x] if x_grad else []) + trainable(mods)
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves))


@contextlib.contextmanager
def kernels(mode: str):
    before = os.environ.get("GAZELLE_KERNELS")
    os.environ["GAZELLE_KERNELS"] = mode
    try:
        yield
    finally:
        if before is None:
            del os.environ["GAZELLE_KERNELS"]
        else:
            os.environ["GAZELLE_KERNELS"] = before


def run_ref(fn, x: torch.Tensor, mods, x_grad=True):
    """run() with GAZELLE_KERNELS=ref: plain autograd through the modules (LoraLinear itself may dispatch to
    the fused path otherwise)."""
    with kernels("ref"):
        return run(fn, x, mods, x_grad)


def assert_close(fast, ref, dtype):
    atol, rtol = TOLERANCE[dtype]
    (out_f, grad_f), (out_r, grad_r) = fast, ref
    assert len(out_f) == len(out_r) and len(grad_f) == len(grad_r)
    for i, (a, b) in enumerate(zip(out_f + grad_f, out_r + grad_r)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"tensor {i}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"tensor {i}: {m}")


def projections(*mods) -> list[LoraProjection]:
    ps = [LoraProjection.of(m) for m in mods]
    assert all(p is not None for p in ps)
    return ps


def assert_fused(y: torch.Tensor, name: str):
    assert type(y.grad_fn).__name__ == f"{name}Backward", type(y.grad_fn).__name__


CASES = [pytest.param(d, q, b, id=f"{str(d)[6:]}-{'nf4' if q else 'dense'}-{'bias' if b else 'nobias'}")
         for d in (torch.float32, torch.float64) for q in (False, True) for b in (False, True)]


def tokens(dtype, features=HIDDEN, device="cpu", seed=1):
    return torch.randn(*LEAD, features, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


# ------------------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("dtype, nf4, bias", CASES)
def test_lora_linear(cpu_fused, dtype, nf4, bias):
    m = make_lora(HIDDEN, OUT, dtype=dtype, bias=bias, nf4=nf4)
    (p,) = projections(m)
    x = tokens(dtype)
    fast = run(lambda t: lora_linear(t, p), x, [m])
    assert_close(fast, run_ref(m, x, [m]), dtype)
    assert_fused(lora_linear(x.requires_grad_(), p), "_LoraGroupFunction")


@pytest.mark.parametrize("dtype, nf4, bias", CASES)
def test_lora_qkv(cpu_fused, dtype, nf4, bias):
    q = make_lora(HIDDEN, OUT, dtype=dtype, bias=bias, nf4=nf4, seed=0)
    k = make_lora(HIDDEN, 20, dtype=dtype, bias=bias, nf4=nf4, seed=1, r=2, alpha=4.0)  # unequal ranks stack
    v = make_lora(HIDDEN, 20, dtype=dtype, bias=bias, nf4=nf4, seed=2, alpha=2.0)  # scaling 0.5
    ps = projections(q, k, v)
    x = tokens(dtype)
    fast = run(lambda t: lora_qkv(t, *ps), x, [q, k, v])
    assert_close(fast, run_ref(lambda t: (q(t), k(t), v(t)), x, [q, k, v]), dtype)


def test_cast_adapters_follow_every_change(cpu_fused):
    """The fused path keeps the adapters cast (and B scaled) between calls: an optimizer step (a fused one too), an
    in-place write, a new scaling and a replaced parameter must each show in the next call, for stacked and single
    projections."""
    mods = [make_lora(HIDDEN, n, seed=s) for s, n in enumerate((OUT, 20, 20))]
    x = tokens(torch.float32)
    opt = torch.optim.AdamW(trainable(mods), lr=0.1)

    def check():
        ps = projections(*mods)
        assert_close(run(lambda t: lora_qkv(t, *ps), x, mods),
                     run_ref(lambda t: (mods[0](t), mods[1](t), mods[2](t)), x, mods), torch.float32)
        (p,) = projections(mods[1])
        assert_close(run(lambda t: lora_linear(t, p), x, mods[1:2]), run_ref(mods[1], x, mods[1:2]), torch.float32)

    check()
    for _ in range(2):
        sum(o.sum() for o in lora_qkv(x, *projections(*mods))).backward()
        opt.step()
        opt.zero_grad()
        check()
    fused = torch.optim.AdamW(trainable(mods), lr=0.1, fused=True)  # writes without bumping version counters
    sum(o.sum() for o in lora_qkv(x, *projections(*mods))).backward()
    fused.step()
    check()
    with torch.no_grad():
        mods[1].lora_A.weight.mul_(-1.5)
        mods[2].lora_B.weight.add_(0.25)
    check()
    mods[0].scaling = 3.0
    check()
    mods[2].lora_B.weight = nn.Parameter(torch.randn_like(mods[2].lora_B.weight))
    check()


def test_refresh_casts_rewrites_stale_casts_in_place(cpu_fused):
    """What a replayed CUDA graph reads: after an optimizer step, refresh_casts writes each kept cast again in the
    same tensor, equal to the adapters' new values (stacked A, scaled B)."""
    from gazelle.kernels import lora

    mods = [make_lora(HIDDEN, n, seed=s) for s, n in enumerate((OUT, 20, 20))]
    x = tokens(torch.float32)
    opt = torch.optim.AdamW(trainable(mods), lr=0.1)
    sum(o.sum() for o in lora_qkv(x, *projections(*mods))).backward()
    opt.step()
    stacked = lora._CASTS[id(mods[0].lora_A.weight)][("a", torch.float32, 3)]
    scaled = lora._CASTS[id(mods[2].lora_B.weight)][("b", torch.float32, 1)]
    kept = (stacked.out.data_ptr(), scaled.out.data_ptr())
    assert not torch.equal(stacked.out, torch.cat([m.lora_A.weight for m in mods]))  # stale after the step
    lora.refresh_casts()
    assert (stacked.out.data_ptr(), scaled.out.data_ptr()) == kept
    torch.testing.assert_close(stacked.out, torch.cat([m.lora_A.weight for m in mods]), atol=0, rtol=0)
    torch.testing.assert_close(scaled.out, mods[2].lora_B.weight * mods[2].scaling, atol=0, rtol=0)
    # a write no stamp sees (through .data, no optimizer): only every=True, what a captured step begins with, redoes it
    mods[2].lora_B.weight.data.add_(1.0)
    lora.refresh_casts()
    assert not torch.equal(scaled.out, mods[2].lora_B.weight * mods[2].scaling)
    lora.refresh_casts(every=True)
    assert scaled.out.data_ptr() == kept[1]
    torch.testing.assert_close(scaled.out, mods[2].lora_B.weight * mods[2].scaling, atol=0, rtol=0)


def test_lora_qkv_unused_output(cpu_fused):
    """An output that takes no part in the loss gets a zero gradient (autograd materializes it)."""
    mods = [make_lora(HIDDEN, n, seed=s) for s, n in enumerate((OUT, 20, 20))]
    ps = projections(*mods)
    x = tokens(torch.float32)
    used = [mods[0], mods[2]]
    fast = run(lambda t: lora_qkv(t, *ps)[::2], x, used)
    assert_close(fast, run_ref(lambda t: (mods[0](t), mods[2](t)), x, used), torch.float32)


def mlp_modules(dtype, nf4, bias, fused_gate_up=False):
    down = make_lora(INTER, HIDDEN, dtype=dtype, bias=bias, nf4=nf4, seed=12)
    if fused_gate_up:
        return [make_lora(HIDDEN, 2 * INTER, dtype=dtype, bias=bias, nf4=nf4, seed=13), down]
    return [make_lora(HIDDEN, INTER, dtype=dtype, bias=bias, nf4=nf4, seed=10),
            make_lora(HIDDEN, INTER, dtype=dtype, bias=bias, nf4=nf4, seed=11), down]


def mlp_module_fn(mods, act):
    """decoder.MLP's forward over the modules: the oracle."""
    if len(mods) == 2:
        gate_up, down = mods

        def fn(t):
            e, u = gate_up(t).chunk(2, dim=-1)
            return down(ACTS[act](e) * u)

        return fn
    gate, up, down = mods
    return lambda t: down(ACTS[act](gate(t)) * up(t))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("dtype, nf4, bias", CASES)
def test_lora_mlp(cpu_fused, dtype, nf4, bias, act):
    mods = mlp_modules(dtype, nf4, bias)
    gate, up, down = projections(*mods)
    x = tokens(dtype)
    fast = run(lambda t: lora_mlp(t, gate, up, down, act), x, mods)
    assert_close(fast, run_ref(mlp_module_fn(mods, act), x, mods), dtype)
    assert_fused(lora_mlp(x.requires_grad_(), gate, up, down, act), "_LoraMlpFunction")


@pytest.mark.parametrize("fused_gate_up", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_lora_mlp_without_output_gives_the_same_gradients(cpu_fused, nf4, fused_gate_up):
    """output=False (a recomputation) skips the down projection; every gradient is still autograd's."""
    mods = mlp_modules(torch.float32, nf4, True, fused_gate_up)
    ps = projections(*mods)
    kw = dict(down=ps[-1], gate_up=ps[0]) if fused_gate_up else dict(gate=ps[0], up=ps[1], down=ps[2])
    x = tokens(torch.float32)
    _, grads = run(lambda t: lora_mlp(t, act="silu", output=False, **kw), x, mods)
    _, ref = run_ref(mlp_module_fn(mods, "silu"), x, mods)
    assert len(grads) == len(ref) == 1 + 2 * len(mods) + len(mods)  # x, A and B, trained biases
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("dtype, nf4, bias", CASES)
def test_lora_mlp_fused_gate_up(cpu_fused, dtype, nf4, bias, act):
    mods = mlp_modules(dtype, nf4, bias, fused_gate_up=True)
    gate_up, down = projections(*mods)
    x = tokens(dtype)
    fast = run(lambda t: lora_mlp(t, down=down, act=act, gate_up=gate_up), x, mods)
    assert_close(fast, run_ref(mlp_module_fn(mods, act), x, mods), dtype)


def test_frozen_input_and_frozen_bias(cpu_fused):
    """The first layer's input needs no gradient (frozen embeddings); a bias may be present and frozen."""
    mods = [make_lora(HIDDEN, INTER, bias=True, train_bias=False, seed=s) for s in (20, 21)]
    mods.append(make_lora(INTER, HIDDEN, bias=True, seed=22))
    gate, up, down = projections(*mods)
    x = tokens(torch.float32)
    fast = run(lambda t: lora_mlp(t, gate, up, down), x, mods, x_grad=False)
    assert_close(fast, run_ref(mlp_module_fn(mods, "silu"), x, mods, x_grad=False), torch.float32)
    fast = run(lambda t: lora_qkv(t, gate, up, gate), x, mods[:2], x_grad=False)  # one projection twice
    ref = run_ref(lambda t: (mods[0](t), mods[1](t), mods[0](t)), x, mods[:2], x_grad=False)
    assert_close(fast, ref, torch.float32)


def saved_bytes(fn, x: torch.Tensor, mods) -> int:
    """Bytes of the distinct storages autograd keeps for backward, besides x and the modules' own tensors."""
    own = {t.untyped_storage().data_ptr() for m in mods for t in [*m.parameters(), *m.buffers()]}
    own.add(x.untyped_storage().data_ptr())
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(kept.values())


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_lora_mlp_saves_less(cpu_fused, nf4):
    """The fused MLP keeps e, u and the (N, r) adapter inputs; plain autograd also act(e), h (and NF4 weights)."""
    mods = mlp_modules(torch.float32, nf4, False)
    x = tokens(torch.float32).requires_grad_()
    n = x.numel() // HIDDEN
    fused_bytes = saved_bytes(lambda t: lora_mlp(t, *projections(*mods)), x, mods)
    assert fused_bytes == 4 * (2 * n * INTER + 3 * n * R)  # e, u, x Ag^T, x Au^T, h Ad^T in float32
    with kernels("ref"):
        ref_bytes = saved_bytes(mlp_module_fn(mods, "silu"), x, mods)
    weights = 3 * 4 * HIDDEN * INTER if nf4 else 0  # the dequantized float32 bases
    assert ref_bytes == 4 * (4 * n * INTER + 3 * n * R) + weights


def test_strided_input(cpu_fused):
    m = make_lora(HIDDEN, OUT, bias=True)
    (p,) = projections(m)
    wide = tokens(torch.float32, features=2 * HIDDEN)
    assert not wide[..., ::2].is_contiguous()  # (2, 7, 24) with a column stride of 2
    fast = run(lambda t: lora_linear(t[..., ::2], p), wide, [m])
    assert_close(fast, run_ref(lambda t: m(t[..., ::2]), wide, [m]), torch.float32)


@pytest.mark.parametrize("dtype, nf4, bias", CASES)
def test_residual_added_by_the_products(cpu_fused, dtype, nf4, bias):
    """residual= (the decoder layer's residual stream): lora_linear and lora_mlp equal residual + the modules, in
    value and in every gradient, the residual's included, and the fused node itself returns the sum (no add
    node after it). The input and the residual are two column ranges of one tensor, so both are strided."""
    m = make_lora(HIDDEN, OUT, dtype=dtype, bias=bias, nf4=nf4)
    (p,) = projections(m)
    both = tokens(dtype, features=HIDDEN + OUT)
    split = lambda t: (t[..., :HIDDEN], t[..., HIDDEN:])  # noqa: E731
    fast = run(lambda t: lora_linear(*split(t)[:1], p, residual=split(t)[1]), both, [m])
    assert_close(fast, run_ref(lambda t: split(t)[1] + m(split(t)[0]), both, [m]), dtype)
    x, r = split(both.requires_grad_())
    assert_fused(lora_linear(x, p, residual=r), "_LoraGroupFunction")

    mods = mlp_modules(dtype, nf4, bias)
    gate, up, down = projections(*mods)
    both = tokens(dtype, features=2 * HIDDEN)
    split = lambda t: (t[..., :HIDDEN], t[..., HIDDEN:])  # noqa: E731
    fn = mlp_module_fn(mods, "silu")
    ref = run_ref(lambda t: split(t)[1] + fn(split(t)[0]), both, mods)
    assert_close(run(lambda t: lora_mlp(split(t)[0], gate, up, down, residual=split(t)[1]), both, mods), ref, dtype)
    x, r = split(both.requires_grad_())
    assert_fused(lora_mlp(x, gate, up, down, residual=r), "_LoraMlpFunction")
    # output=False (a recomputation): values unwritten, every gradient (the residual's too) still autograd's
    _, grads = run(lambda t: lora_mlp(split(t)[0], gate, up, down, output=False, residual=split(t)[1]), both, mods)
    assert_close(([], grads), ([], ref[1]), dtype)


def test_residual_of_another_dtype_is_added_after(cpu_fused):
    """A residual the products cannot take (float64 beside float32 activations) is added by torch: promoted as
    residual + module(x) would be."""
    m = make_lora(HIDDEN, OUT)
    (p,) = projections(m)
    x, r = tokens(torch.float32), tokens(torch.float64, features=OUT, seed=2)
    y = lora_linear(x, p, residual=r)
    assert y.dtype == torch.float64
    with kernels("ref"):
        torch.testing.assert_close(y, r + m(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["ref", "auto"])
def test_dispatch_reference(monkeypatch, mode):
    """GAZELLE_KERNELS=ref, and auto on CPU, run the reference: exactly the modules' own computation."""
    monkeypatch.setenv("GAZELLE_KERNELS", mode)
    mods = mlp_modules(torch.float32, False, True)
    gate, up, down = projections(*mods)
    x = tokens(torch.float32)
    y = lora_mlp(x, gate, up, down)
    assert "Lora" not in type(y.grad_fn).__name__
    assert torch.equal(y, mlp_module_fn(mods, "silu")(x))
    assert torch.equal(lora_linear(x, gate), mods[0](x))
    assert all(torch.equal(a, b) for a, b in zip(lora_qkv(x, gate, up, gate), (mods[0](x), mods[1](x), mods[0](x))))
    r = tokens(torch.float32, seed=3)
    assert torch.equal(lora_mlp(x, gate, up, down, residual=r), r + mlp_module_fn(mods, "silu")(x))


def test_of_declines_what_it_cannot_fuse():
    m = make_lora(HIDDEN, OUT, nf4=True)
    p = LoraProjection.of(m)
    assert p.quantized and p.compute_dtype == torch.float32 and p.scaling == 2.0 and p.lora_a is m.lora_A.weight
    dropout = LoraLinear(nn.Linear(HIDDEN, OUT).requires_grad_(False), R, ALPHA, lora_dropout=0.1)
    assert LoraProjection.of(dropout) is None  # training: dropout active
    assert LoraProjection.of(dropout.eval()) is not None  # eval: dropout is the identity
    m.disabled = True
    assert LoraProjection.of(m) is None
    assert LoraProjection.of(LoraLinear(nn.Linear(HIDDEN, OUT), R, ALPHA)) is None  # trainable base weight

    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert LoraProjection.of(LoraLinear(Scaled(HIDDEN, OUT).requires_grad_(False), R, ALPHA)) is None
    assert LoraProjection.of(nn.Linear(HIDDEN, OUT)) is None
    hooked = make_lora(HIDDEN, OUT)
    hooked.register_forward_hook(lambda *a: None)
    assert LoraProjection.of(hooked) is None


def test_mlp_arguments():
    gate, up, down = projections(*mlp_modules(torch.float32, False, False))
    x = tokens(torch.float32)
    with pytest.raises(ValueError):
        lora_mlp(x, gate, up, down, act="relu")
    with pytest.raises(ValueError):
        lora_mlp(x, gate, None, down)
    with pytest.raises(ValueError):
        lora_mlp(x, gate, up, down, gate_up=gate)


# ------------------------------------------------------------------------------------------------------ GPU

MODELS = {  # tokens, hidden, intermediate, q heads x head_dim, kv heads x head_dim, qkv bias
    "qwen-1.5B": dict(n=8192, hidden=1536, inter=8960, q=1536, kv=256, qkv_bias=True),
    "llama-8B": dict(n=4096, hidden=4096, inter=14336, q=4096, kv=1024, qkv_bias=False),
}
GPU_R, GPU_ALPHA = 32, 64.0


def gpu_pair(in_f, out_f, nf4, bias, seed):
    """(fast: bf16 base, ref: float32 base) LoraLinear twins with the same LoRA weights (and the same NF4 codes)."""
    ref = make_lora(in_f, out_f, bias=bias, nf4=nf4, r=GPU_R, alpha=GPU_ALPHA, seed=seed, device="cuda")
    fast = copy.deepcopy(ref)
    if nf4:
        fast.base_layer.compute_dtype = torch.bfloat16  # same codes, dequantized to bf16
    else:
        fast.base_layer.to(torch.bfloat16)
    return fast, ref


def gpu_mlp_pairs(cfg: dict, nf4: bool):
    """(fast, ref) module triples gate, up, down at a MODELS shape, without biases."""
    h, inter = cfg["hidden"], cfg["inter"]
    pairs = [gpu_pair(h, inter, nf4, False, 1), gpu_pair(h, inter, nf4, False, 2), gpu_pair(inter, h, nf4, False, 3)]
    return tuple(zip(*pairs))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_rel(fast, ref, tol=1e-2):
    (out_f, grad_f), (out_r, grad_r) = fast, ref
    errors = [rel_error(a, b) for a, b in zip(out_f + grad_f, out_r + grad_r)]
    assert max(errors) < tol, errors


@needs_gpu
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("op", ["mlp", "qkv", "o"])
def test_gpu_bf16(fused, model, nf4, op):
    cfg = MODELS[model]
    h = cfg["hidden"]
    if op == "mlp":
        fast_mods, ref_mods = gpu_mlp_pairs(cfg, nf4)
        gate, up, down = projections(*fast_mods)
        fast_fn, ref_fn = (lambda t: lora_mlp(t, gate, up, down, "silu")), mlp_module_fn(ref_mods, "silu")
    elif op == "qkv":
        pairs = [gpu_pair(h, n, nf4, cfg["qkv_bias"], s) for s, n in enumerate((cfg["q"], cfg["kv"], cfg["kv"]))]
        fast_mods, ref_mods = zip(*pairs)
        ps = projections(*fast_mods)
        fast_fn, ref_fn = (lambda t: lora_qkv(t, *ps)), (lambda t: tuple(m(t) for m in ref_mods))
    else:
        fast_m, ref_m = gpu_pair(cfg["q"], h, nf4, False, 7)
        fast_mods, ref_mods = [fast_m], [ref_m]
        (p,) = projections(fast_m)
        fast_fn, ref_fn = (lambda t: lora_linear(t, p)), ref_m
    x = torch.randn(1, cfg["n"], cfg["q"] if op == "o" else h, device="cuda")
    fast = run(fast_fn, x.bfloat16(), fast_mods)
    y = fast_fn(x.bfloat16().requires_grad_())
    assert_fused(y[0] if op == "qkv" else y, "_LoraMlpFunction" if op == "mlp" else "_LoraGroupFunction")
    assert_rel(fast, run_ref(ref_fn, x, ref_mods))


@needs_gpu
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("op", ["mlp", "o"])
def test_gpu_bf16_residual(fused, nf4, op):
    """The llama-8B shape's o and MLP products adding the residual stream, bf16 against float32 modules (+ the
    residual by torch): outputs and every gradient, the residual's included, relative error < 1e-2."""
    cfg = MODELS["llama-8B"]
    h = cfg["hidden"]
    if op == "mlp":
        fast_mods, ref_mods = gpu_mlp_pairs(cfg, nf4)
        gate, up, down = projections(*fast_mods)
        width, module = h, mlp_module_fn(ref_mods, "silu")
        fast_fn = lambda t: lora_mlp(t[..., :width], gate, up, down, residual=t[..., width:])  # noqa: E731
    else:
        fast_m, ref_m = gpu_pair(cfg["q"], h, nf4, False, 7)
        fast_mods, ref_mods, (p,) = [fast_m], [ref_m], projections(fast_m)
        width, module = cfg["q"], ref_m
        fast_fn = lambda t: lora_linear(t[..., :width], p, residual=t[..., width:])  # noqa: E731
    both = torch.randn(1, cfg["n"], width + h, device="cuda")
    fast = run(fast_fn, both.bfloat16(), fast_mods)
    assert_fused(fast_fn(both.bfloat16().requires_grad_()), "_LoraMlpFunction" if op == "mlp" else "_LoraGroupFunction")
    assert_rel(fast, run_ref(lambda t: t[..., width:] + module(t[..., :width]), both, ref_mods))


@needs_gpu
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_gpu_mlp_saves_less(fused, nf4):
    """Memory held from forward to backward (output included): e and u against e, act(e), u, h (+ NF4 weights)."""
    cfg = MODELS["qwen-1.5B"]
    n, h, inter = cfg["n"], cfg["hidden"], cfg["inter"]
    mods = list(gpu_mlp_pairs(cfg, nf4)[0])
    gate, up, down = projections(*mods)
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def held(fn) -> int:
        fn(x).sum().backward()  # warm-up: cuBLAS workspaces, kernel caches and .grad buffers are allocated here
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = fn(x)
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before
        y.sum().backward()  # the graph must still work
        return kept

    fused_bytes = held(lambda t: lora_mlp(t, gate, up, down))
    with kernels("ref"):  # plain autograd through the modules
        ref_bytes = held(mlp_module_fn(mods, "silu"))
    expected = 2 * (2 * n * inter + n * h + 3 * n * GPU_R)  # e, u, y, xa (2r), ha (r) in bf16
    assert fused_bytes <= expected * 1.02, (fused_bytes, expected)
    assert fused_bytes < 0.6 * ref_bytes, (fused_bytes, ref_bytes)
