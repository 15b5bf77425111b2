"""Rotary position embedding applied to q and k in their projection layout (B, T, heads, D), in place.

The half-split convention of Hugging Face checkpoints: with R = cos.shape[-1] <= D rotated dims,
h = R / 2, x1 = x[..., :h], x2 = x[..., h:R] and c1, c2 / s1, s2 the halves of cos / sin:
    out[..., :h]  = x1 * c1 - x2 * s1
    out[..., h:R] = x2 * c2 + x1 * s2
    out[..., R:]  = x[..., R:]            (partial rotary, phi-style: untouched)
Every scaling scheme (linear, llama3, yarn, longrope, attention_factor) lives in the cos/sin tables
(gazelle.models.rope.RotaryTables), so one kernel serves them all.

q and k may be strided views of a fused qkv projection: the kernel takes each tensor's four strides. Rotating
in place saves the two (B, heads, T, D) copies of the reference. In 16-bit, each product and the sum are
rounded to the storage dtype as torch's elementwise ops (and Hugging Face's `q * cos + rotate_half(q) * sin`)
do, so the forward matches the reference bit for bit.
"""

from __future__ import annotations

import torch

from gazelle.kernels import dispatch
from gazelle.kernels._triton import cdiv, jit, next_power_of_2, tl

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, T, Hq, D), k (B, T, Hk, D), cos/sin (B, T, R), R <= D even -> rotated (q, k), out of place."""
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, R)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


@jit
def _rotary_kernel(x_ptr, o_ptr, cos_ptr, sin_ptr, T, H, HALF, PASS,
                   sx_b, sx_t, sx_h, sx_d, so_b, so_t, so_h, so_d, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
                   COPY_PASS: tl.constexpr, BACKWARD: tl.constexpr, UPCAST: tl.constexpr, ROUND: tl.constexpr):
    """Program (b * T + t, head block): rotate heads [j * BLOCK_H, (j + 1) * BLOCK_H) of token (b, t).

    BACKWARD applies the transpose (the inverse rotation when c1 = c2, s1 = s2). COPY_PASS copies dims R..D-1
    when o is another tensor than x. UPCAST computes 16-bit data in float32; ROUND then rounds each product to
    the storage dtype first, as the reference's separate torch ops do.
    """
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    t = bt % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    head_ok = heads < H
    dim_ok = dims < HALF
    mask = head_ok[:, None] & dim_ok[None, :]

    c_base = cos_ptr + b * sc_b + t * sc_t
    s_base = sin_ptr + b * ss_b + t * ss_t
    c1 = tl.load(c_base + dims * sc_d, mask=dim_ok, other=0.0)[None, :]  # (1, BLOCK_HALF)
    c2 = tl.load(c_base + (dims + HALF) * sc_d, mask=dim_ok, other=0.0)[None, :]
    s1 = tl.load(s_base + dims * ss_d, mask=dim_ok, other=0.0)[None, :]
    s2 = tl.load(s_base + (dims + HALF) * ss_d, mask=dim_ok, other=0.0)[None, :]

    x_row = x_ptr + b * sx_b + t * sx_t + heads[:, None] * sx_h  # (BLOCK_H, 1) pointers
    o_row = o_ptr + b * so_b + t * so_t + heads[:, None] * so_h
    x1 = tl.load(x_row + dims[None, :] * sx_d, mask=mask, other=0.0)  # (BLOCK_H, BLOCK_HALF)
    x2 = tl.load(x_row + (dims[None, :] + HALF) * sx_d, mask=mask, other=0.0)
    if UPCAST:
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        c1, c2, s1, s2 = c1.to(tl.float32), c2.to(tl.float32), s1.to(tl.float32), s2.to(tl.float32)
    if BACKWARD:  # transpose of [[c1, -s1], [s2, c2]]
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    elif ROUND:
        dt = o_ptr.dtype.element_ty
        o1 = (x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_row + dims[None, :] * so_d, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + (dims[None, :] + HALF) * so_d, o2.to(o_ptr.dtype.element_ty), mask=mask)
    if COPY_PASS:
        rest = tl.arange(0, BLOCK_PASS)
        pass_mask = head_ok[:, None] & (rest < PASS)[None, :]
        kept = tl.load(x_row + (rest[None, :] + 2 * HALF) * sx_d, mask=pass_mask, other=0.0)
        tl.store(o_row + (rest[None, :] + 2 * HALF) * so_d, kept, mask=pass_mask)


def _launch(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    """Rotate x (B, T, H, D) into out (same shape; out may be x) by cos/sin (B, T, R), any strides."""
    B, T, H, D = x.shape
    half = cos.shape[-1] // 2
    n_pass = D - 2 * half
    if B * T * H == 0 or half == 0:
        if out.data_ptr() != x.data_ptr():
            out.copy_(x)
        return
    block_half = next_power_of_2(half)
    block_h = min(next_power_of_2(H), max(1, 4096 // block_half))
    copy_pass = out.data_ptr() != x.data_ptr() and n_pass > 0
    upcast = x.dtype in (torch.bfloat16, torch.float16)
    _rotary_kernel[(B * T, cdiv(H, block_h))](
        x, out, cos, sin, T, H, half, n_pass, *x.stride(), *out.stride(), *cos.stride(), *sin.stride(),
        BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=next_power_of_2(max(n_pass, 1)),
        COPY_PASS=copy_pass, BACKWARD=backward, UPCAST=upcast, ROUND=upcast and not backward,
        num_warps=4 if block_h * block_half <= 2048 else 8,
        # No fused multiply-adds in the forward: the compiler narrows the rounded 16-bit products to native bf16/fp16
        # multiplies and would fuse one into the sum, skipping a rounding the reference does.
        enable_fp_fusion=backward)


def _rotate_back(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)  # contiguous (B, T, H, D)
    _launch(grad, out, cos, sin, backward=True)
    return out


class _RotaryInPlace(torch.autograd.Function):
    """Rotates x (B, T, H, D) in place: x is `target`, or `target.view(shape)` when shape is given (target then is
    the contiguous base that x views entirely). Backward: dx = R^T g, per pair (g1, g2) of the first R dims:
    dx1 = c1 * g1 + s2 * g2, dx2 = c2 * g2 - s1 * g1 (the rotation by -sin for the tables' c1 = c2, s1 = s2);
    dims R..D-1 pass g through. One tensor per call: autograd rebases a dirty view only for single outputs.
    """

    @staticmethod
    def forward(ctx, target, shape, cos, sin):
        x = target if shape is None else target.view(shape)  # (B, T, H, D)
        _launch(x, x, cos, sin, backward=False)
        ctx.mark_dirty(target)
        ctx.save_for_backward(cos, sin)
        ctx.shape = shape
        return target

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        if ctx.shape is None:
            return _rotate_back(grad, cos, sin), None, None, None
        return _rotate_back(grad.reshape(ctx.shape), cos, sin).view(grad.shape), None, None, None


class _RotaryOutOfPlace(torch.autograd.Function):
    """Same rotation and backward as _RotaryInPlace, into a new contiguous tensor: for inputs autograd forbids
    modifying (leaves that require grad, views of them, views from split/chunk)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (B, T, H, D)
        _launch(x, out, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate_back(grad, cos, sin), None, None


def _writable(x: torch.Tensor) -> bool:
    """Whether x can be rotated in place without autograd refusing it, a slow rebase, or aliased elements.

    Under autograd only a non-leaf that is not a view, or a view covering all of its contiguous non-leaf base
    (a projection output seen as heads: `_rotate` then rotates the base), is rotated in place. A partial view
    (q or k sliced out of a fused qkv output) goes out of place: modifying it would make autograd clone the
    whole base's gradient (CopySlices), and views from split/chunk may not be modified at all.
    """
    if any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape)):
        return False  # expanded: several elements share memory
    if not (torch.is_grad_enabled() and x.requires_grad):
        return True
    if x.is_leaf:
        return False
    return x._base is None or _covers_base(x)


def _covers_base(x: torch.Tensor) -> bool:
    base = x._base
    return (not base.is_leaf and base.numel() == x.numel() and base.data_ptr() == x.data_ptr()
            and base.is_contiguous() and x.is_contiguous())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_place: bool) -> torch.Tensor:
    if not (in_place and _writable(x)):
        return _RotaryOutOfPlace.apply(x, cos, sin)
    if torch.is_grad_enabled() and x.requires_grad and x._base is not None:
        # x is all of a contiguous base (a projection output viewed as heads): rotating the base itself spares
        # autograd rebasing a modified view (CopySlices: a clone of the whole gradient and a copy back).
        return _RotaryInPlace.apply(x._base, x.shape, cos, sin).view(x.shape)
    return _RotaryInPlace.apply(x, None, cos, sin)


def _unsupported(q, k, cos, sin) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return "q/k must be (B, T, heads, D) and cos/sin (B, T, R)"
    if not (q.dtype == k.dtype == cos.dtype == sin.dtype):
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, cos/sin {cos.dtype}"
    rot = cos.shape[-1]
    if rot % 2 or rot > q.shape[-1] or q.shape[-1] != k.shape[-1] or q.shape[:2] != k.shape[:2]:
        return f"rotary dim {rot} against q {tuple(q.shape)}, k {tuple(k.shape)}"
    if cos.requires_grad or sin.requires_grad:
        return "cos/sin require grad; the kernel treats them as tables"
    try:
        fits = torch.broadcast_shapes(cos.shape[:2], q.shape[:2]) == q.shape[:2]
    except RuntimeError:
        fits = False
    if not fits:
        return f"cos/sin {tuple(cos.shape)} do not broadcast to q {tuple(q.shape)}"
    return None


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of q (B, T, Hq, D) and k (B, T, Hk, D) by cos/sin (B, T, R): returns (q, k) rotated.

    The Triton path rotates q and k in place where autograd allows it, into new tensors otherwise (leaves that
    require grad, views from torch.split/chunk); the reference returns new tensors. Use the returned tensors, and
    do not rely on q/k keeping their values.

    Cost under autograd (H100, bf16, measured): q/k each viewing a whole projection output are rotated through
    their base, as cheap as out of place and without the extra memory. q/k sliced out of one fused qkv tensor
    are views autograd must rebase (CopySlices clones the whole qkv gradient per view): their backward costs
    about 3.5x the out-of-place path; taking them with torch.split instead selects out of place under autograd
    (and still in place under no_grad).
    """
    if dispatch.use_triton("rotary", q, k, cos, sin, dtypes=KERNEL_DTYPES):
        reason = _unsupported(q, k, cos, sin)
        if reason is None:
            B, T = q.shape[:2]
            cos, sin = cos.expand(B, T, -1), sin.expand(B, T, -1)  # (B, T, R); broadcast dims get stride 0
            if k.data_ptr() == q.data_ptr():  # k is q (or starts on it): rotate k out of place before q changes
                k_out = _rotate(k, cos, sin, in_place=False)
                return _rotate(q, cos, sin, in_place=True), k_out
            return _rotate(q, cos, sin, in_place=True), _rotate(k, cos, sin, in_place=True)
        dispatch.fallback("rotary", reason)
    return apply_rotary_ref(q, k, cos, sin)
