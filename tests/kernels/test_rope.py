"""Triton in-place rotary embedding against its reference (the half-split rotation of gazelle.models.rope)."""

from __future__ import annotations

import pytest
import torch

from gazelle.kernels.rope import apply_rotary_, apply_rotary_ref
from gazelle.models.config import RopeConfig
from gazelle.models.rope import RotaryTables
from tests.kernels.check import TOLERANCE, assert_matches, needs_gpu, needs_interpreter

B, T, HQ, HK, D = 2, 5, 4, 2, 16


def _rope(kind: str, rotary_dim: int) -> RopeConfig:
    if kind == "default":
        return RopeConfig(rotary_dim=rotary_dim)
    if kind == "yarn":  # scaled frequencies and attention_factor != 1 in the tables
        return RopeConfig(rotary_dim=rotary_dim, rope_type="yarn", factor=4.0, original_max_position_embeddings=8,
                          attention_factor=1.2)
    if kind == "llama3":
        return RopeConfig(rotary_dim=rotary_dim, theta=500000.0, rope_type="llama3", factor=8.0,
                          original_max_position_embeddings=8)
    raise ValueError(kind)


def _tables(kind, rotary_dim, dtype, batch=B, seq=T, device="cpu"):
    """cos/sin (batch, seq, rotary_dim) from RotaryTables, each batch row at other positions."""
    offsets = torch.arange(batch, device=device)[:, None] * 7  # (batch, 1)
    positions = torch.arange(seq, device=device)[None, :] + offsets  # (batch, seq)
    return RotaryTables(_rope(kind, rotary_dim))(positions, dtype)


def _fused_views(y, hq, hk, d, split=False):
    """q (B, T, hq, d) and k (B, T, hk, d) as strided views of the fused projection y (B, T, (hq + 2 hk) d)."""
    b, t, _ = y.shape
    if split:  # torch.split's views: autograd forbids modifying them in place
        q, k, v = y.split([hq * d, hk * d, hk * d], dim=-1)
    else:
        q, k, v = y[..., : hq * d], y[..., hq * d: (hq + hk) * d], y[..., (hq + hk) * d:]
    return q.view(b, t, hq, d), k.view(b, t, hk, d), v


def _grad_fn_name(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__


DTYPES = [torch.float32, torch.float64]  # bf16/fp16 math is unreliable in the interpreter: GPU tests below


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, rotary_dim", [("default", 16), ("yarn", 16), ("default", 8), ("llama3", 10)])
def test_leaf_inputs_match_reference(triton_mode, dtype, kind, rotary_dim):
    """Leaves that require grad cannot change in place: the out-of-place kernel path, forward and dq, dk."""
    cos, sin = _tables(kind, rotary_dim, dtype)
    q = torch.randn(B, T, HQ, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, HK, D, dtype=dtype, requires_grad=True)
    assert all(_grad_fn_name(o).startswith("_RotaryOutOfPlace") for o in apply_rotary_(q, k, cos, sin))
    assert_matches(apply_rotary_, apply_rotary_ref, [q, k, cos, sin])


def _through_fused(fn, x, w, cos, sin, hq=HQ, hk=HK, d=D, split=False):
    """y = x @ w split into q/k/v views, fn(q, k), a loss on q, k, v: returns q, k, dL/dx, whether q, k stayed y's."""
    y = x @ w  # (B, T, (hq + 2 hk) d)
    q, k, v = _fused_views(y, hq, hk, d, split)
    q_out, k_out = fn(q, k, cos, sin)
    in_place = q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    if in_place:  # the rotation landed in the fused tensor itself
        assert torch.equal(_fused_views(y.detach(), hq, hk, d)[0], q_out.detach())
    gen = torch.Generator().manual_seed(1)
    g_q = torch.randn(q_out.shape, generator=gen, dtype=q_out.dtype)
    g_k = torch.randn(k_out.shape, generator=gen, dtype=k_out.dtype)
    loss = (q_out * g_q).sum() + (k_out * g_k).sum() + v.square().sum()
    (dx,) = torch.autograd.grad(loss, [x])
    return q_out.detach(), k_out.detach(), dx, in_place


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, rotary_dim", [("default", 16), ("default", 8), ("yarn", 8)])
def test_in_place_on_fused_projection_views(triton_mode, dtype, kind, rotary_dim):
    """q/k as non-contiguous views of one fused qkv output: under autograd rotated out of place (modifying a
    partial view would clone the whole qkv gradient); the gradient reaching the projection input through the
    views equals the reference's; partial rotary leaves dims R.. untouched."""
    cos, sin = _tables(kind, rotary_dim, dtype)
    x = torch.randn(B, T, 6, dtype=dtype, requires_grad=True)
    w = torch.randn(6, (HQ + 2 * HK) * D, dtype=dtype)
    q, k, dx, in_place = _through_fused(apply_rotary_, x, w, cos, sin)
    q_ref, k_ref, dx_ref, ref_in_place = _through_fused(apply_rotary_ref, x, w, cos, sin)
    assert not in_place and not ref_in_place
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(q, q_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(k, k_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx, dx_ref, atol=atol, rtol=rtol)
    q_in = _fused_views((x @ w).detach(), HQ, HK, D)[0]
    assert torch.equal(q[..., rotary_dim:], q_in[..., rotary_dim:])


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_on_separate_projections(triton_mode, dtype):
    """q = q_proj(x).view(B, T, H, D), which views all of its base: the base is rotated in place (no CopySlices
    node: the returned q's grad_fn is a view of the kernel's), and dL/dx equals the reference's."""
    cos, sin = _tables("llama3", 16, dtype)
    x = torch.randn(B, T, 6, dtype=dtype, requires_grad=True)
    w_q, w_k = torch.randn(6, HQ * D, dtype=dtype), torch.randn(6, HK * D, dtype=dtype)

    def run(fn):
        q, k = (x @ w_q).view(B, T, HQ, D), (x @ w_k).view(B, T, HK, D)
        q_in = q.detach().clone()
        q_out, k_out = fn(q, k, cos, sin)
        loss = (q_out * torch.linspace(-1, 1, q_out.numel(), dtype=dtype).view(q_out.shape)).sum() + k_out.square().sum()
        return q_out, k_out, torch.autograd.grad(loss, [x])[0], q_in, q

    q_out, k_out, dx, q_in, q = run(apply_rotary_)
    q_ref, k_ref, dx_ref, _, _ = run(apply_rotary_ref)
    assert q_out.data_ptr() == q.data_ptr() and not torch.equal(q.detach(), q_in)
    assert type(q_out.grad_fn.next_functions[0][0]).__name__.startswith("_RotaryInPlace")
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close((q_out, k_out, dx), (q_ref, k_ref, dx_ref), atol=atol, rtol=rtol)


@needs_interpreter
def test_split_views_rotate_out_of_place(triton_mode):
    """Views from torch.split may not change in place under autograd: they take the out-of-place kernel."""
    cos, sin = _tables("default", 8, torch.float32)
    x = torch.randn(B, T, 6, requires_grad=True)
    w = torch.randn(6, (HQ + 2 * HK) * D)
    q, k, dx, in_place = _through_fused(apply_rotary_, x, w, cos, sin, split=True)
    q_ref, k_ref, dx_ref, _ = _through_fused(apply_rotary_ref, x, w, cos, sin, split=True)
    assert not in_place
    torch.testing.assert_close((q, k, dx), (q_ref, k_ref, dx_ref), atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_no_grad_in_place_and_broadcast_tables(triton_mode):
    """Without autograd, even split views change in place; (1, T, R) tables broadcast over the batch."""
    cos, sin = _tables("default", 16, torch.float32, batch=1)
    y = torch.randn(B, T, (HQ + 2 * HK) * D)
    expected = apply_rotary_ref(*_fused_views(y, HQ, HK, D)[:2], cos, sin)
    q, k, _ = _fused_views(y, HQ, HK, D, split=True)
    with torch.no_grad():
        q_out, k_out = apply_rotary_(q, k, cos, sin)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close((q, k), expected, atol=1e-6, rtol=1e-6)


@needs_interpreter
def test_same_tensor_for_q_and_k(triton_mode):
    q = torch.randn(B, T, HQ, D)
    cos, sin = _tables("default", 16, torch.float32)
    expected = apply_rotary_ref(q, q, cos, sin)
    torch.testing.assert_close(apply_rotary_(q, q, cos, sin), expected, atol=1e-6, rtol=1e-6)


def test_dispatch_ref_mode(monkeypatch):
    monkeypatch.setenv("GAZELLE_KERNELS", "ref")
    cos, sin = _tables("default", 16, torch.float32)
    q, k = torch.randn(B, T, HQ, D), torch.randn(B, T, HK, D)
    q0 = q.clone()
    q_out, k_out = apply_rotary_(q, k, cos, sin)
    assert torch.equal(q, q0)  # the reference is out of place
    assert torch.equal(q_out, apply_rotary_ref(q, k, cos, sin)[0])


@needs_interpreter
def test_fallbacks(triton_mode):
    """Tables that require grad, or of another dtype than q/k, run the reference (which gives cos/sin grads)."""
    cos, sin = _tables("default", 16, torch.float32)
    q = torch.randn(B, T, HQ, D, requires_grad=True)
    k = torch.randn(B, T, HK, D, requires_grad=True)
    cos_g = cos.clone().requires_grad_()
    q_out, _ = apply_rotary_(q, k, cos_g, sin)
    (g_cos,) = torch.autograd.grad(q_out.sum(), [cos_g])
    assert g_cos is not None and not _grad_fn_name(q_out).startswith("_Rotary")
    q_out, _ = apply_rotary_(q, k, cos.double(), sin.double())
    assert q_out.dtype == torch.float64  # the reference's promotion


# ---- GPU: realistic shapes, compiled kernels ----

GPU_SHAPES = {"qwen-1.5B": (8, 1024, 12, 2, 128), "llama-8B": (2, 2048, 32, 8, 128)}


@needs_gpu
@pytest.mark.parametrize("name", list(GPU_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind, partial", [("default", 1.0), ("llama3", 1.0), ("yarn", 0.75)])
def test_fused_views_gpu(monkeypatch, name, dtype, kind, partial):
    """Views of a fused qkv tensor under autograd, against the float32 reference: forward and the gradient of the
    fused tensor (TOLERANCE: fp32 1e-5, bf16 2e-2). Partial views go out of place (gazelle.kernels.rope: in place,
    autograd would rebase the whole fused tensor, slower). bf16 forwards equal the bf16 reference bit for bit: the
    kernel rounds each product and the sum as torch's separate ops do."""
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    b, t, hq, hk, d = GPU_SHAPES[name]
    rot = int(d * partial)
    cos, sin = _tables(kind, rot, dtype, batch=b, seq=t, device="cuda")
    y0 = torch.randn(b, t, (hq + 2 * hk) * d, device="cuda").to(dtype).requires_grad_()

    def run(fn, y_leaf, c, s):
        y = y_leaf.clone()  # a non-leaf: its views may change in place
        q, k, v = _fused_views(y, hq, hk, d)
        q_out, k_out = fn(q, k, c, s)
        gen = torch.Generator(device="cuda").manual_seed(2)
        loss = sum((o.float() * torch.randn(o.shape, device="cuda", generator=gen)).sum() for o in (q_out, k_out, v))
        (dy,) = torch.autograd.grad(loss, [y_leaf])
        return q_out.detach(), k_out.detach(), dy, q_out.data_ptr() == q.data_ptr()

    q, k, dy, in_place = run(apply_rotary_, y0, cos, sin)
    assert not in_place
    y32 = y0.detach().float().requires_grad_()
    q_ref, k_ref, dy_ref, _ = run(apply_rotary_ref, y32, cos.float(), sin.float())
    atol, rtol = TOLERANCE[dtype]
    for got, ref in ((q, q_ref), (k, k_ref), (dy, dy_ref)):
        torch.testing.assert_close(got.float(), ref, atol=atol, rtol=rtol)
    if dtype == torch.bfloat16:
        with torch.no_grad():
            q16, k16 = apply_rotary_ref(*_fused_views(y0.detach(), hq, hk, d)[:2], cos, sin)
        assert torch.equal(q, q16) and torch.equal(k, k16)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaf_inputs_gpu(monkeypatch, dtype):
    """The out-of-place path (leaf q/k) at the qwen-1.5B shape: forward, dq, dk against the float32 reference."""
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    b, t, hq, hk, d = GPU_SHAPES["qwen-1.5B"]
    cos, sin = _tables("default", d, dtype, batch=b, seq=t, device="cuda")
    q = torch.randn(b, t, hq, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(b, t, hk, d, device="cuda", dtype=dtype, requires_grad=True)
    assert_matches(apply_rotary_, apply_rotary_ref, [q, k, cos, sin])


@needs_gpu
@pytest.mark.parametrize("name", list(GPU_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_separate_projections_gpu(monkeypatch, name, dtype):
    """q/k each viewing a whole projection output (the base is rotated in place): forward and the projection
    outputs' gradients against the float32 reference (TOLERANCE); bf16 forwards equal the bf16 reference."""
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    b, t, hq, hk, d = GPU_SHAPES[name]
    cos, sin = _tables("llama3", d, dtype, batch=b, seq=t, device="cuda")
    pq = torch.randn(b, t, hq * d, device="cuda").to(dtype).requires_grad_()
    pk = torch.randn(b, t, hk * d, device="cuda").to(dtype).requires_grad_()

    def run(fn, leaves, c, s):
        q, k = leaves[0].clone().view(b, t, hq, d), leaves[1].clone().view(b, t, hk, d)
        q_out, k_out = fn(q, k, c, s)
        gen = torch.Generator(device="cuda").manual_seed(3)
        loss = sum((o.float() * torch.randn(o.shape, device="cuda", generator=gen)).sum() for o in (q_out, k_out))
        return q_out.detach(), k_out.detach(), *torch.autograd.grad(loss, leaves), q_out.data_ptr() == q.data_ptr()

    *got, in_place = run(apply_rotary_, [pq, pk], cos, sin)
    assert in_place
    *want, _ = run(apply_rotary_ref, [p.detach().float().requires_grad_() for p in (pq, pk)], cos.float(), sin.float())
    atol, rtol = TOLERANCE[dtype]
    for a, r in zip(got, want):
        torch.testing.assert_close(a.float(), r, atol=atol, rtol=rtol)
    if dtype == torch.bfloat16:
        with torch.no_grad():
            ref16 = apply_rotary_ref(pq.view(b, t, hq, d), pk.view(b, t, hk, d), cos, sin)
        assert torch.equal(got[0], ref16[0]) and torch.equal(got[1], ref16[1])
