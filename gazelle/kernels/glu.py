"""Gated activations act(gate) * up (SwiGLU / GeGLU) as one elementwise Triton kernel each way.

The decoder's MLP computes `act(gate) * up` in the input dtype with two torch ops (each a pass over memory,
plus a saved intermediate for backward). Here forward is one pass that reads gate and up and writes h, and
backward one pass that reads grad_h, gate and up and writes both input gradients; activations are recomputed
from gate rather than stored. Math is float32 inside, results are in the input dtype.

act names are those of gazelle.models.decoder.ACT_FNS:
- "silu" (SwiGLU):     a(g) = g * s,  s = sigmoid(g);           a'(g) = s * (1 + g * (1 - s))
- "gelu_tanh":         a(g) = 0.5 g (1 + t),  t = tanh(k (g + c g^3)),  k = sqrt(2 / pi), c = 0.044715;
                       a'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) k (1 + 3 c g^2)
- "gelu" (exact erf):  a(g) = g Phi(g),  Phi(g) = 0.5 (1 + erf(g / sqrt 2));
                       a'(g) = Phi(g) + g exp(-g^2 / 2) / sqrt(2 pi)

With h = a(gate) * up:  grad_gate = grad_h * up * a'(gate),  grad_up = grad_h * a(gate).

`glu_forward` / `glu_backward` are autograd-free launchers (the fused LoRA MLP calls them inside its own
autograd.Function); they fall back to torch math when dispatch says no, so callers can always use them.
Inputs need equal shapes; each may be strided along its leading dims (e.g. the halves of a fused gate_up
projection, `gate_up.chunk(2, -1)`) as long as its last dim is contiguous; anything else is copied first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gazelle.kernels import dispatch
from gazelle.kernels._triton import cdiv, jit, next_power_of_2, tl

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}  # name -> the kernels' ACT constexpr
_BLOCK = 1024  # columns per program: 4 warps x 32 lanes x 8 elements

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_C = 0.044715


# ----------------------------------------------------------------------------------------------- references


def _check_act(act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTS)}")


def glu_ref(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up with torch ops in the input dtype, exactly as the decoder's MLP computes it."""
    _check_act(act)
    if act == "silu":
        a = F.silu(gate)
    elif act == "gelu_tanh":
        a = F.gelu(gate, approximate="tanh")
    else:
        a = F.gelu(gate)
    return a * up


def _act_and_grad(g: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a(g), a'(g)) by the closed forms of the module docstring (torch, in g's dtype)."""
    if act == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    if act == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (g + _GELU_C * g * g * g))
        da = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * g * g)
        return 0.5 * g * (1 + t), da
    cdf = 0.5 * (1 + torch.erf(g * _INV_SQRT_2))
    return g * cdf, cdf + g * torch.exp(-0.5 * g * g) * _INV_SQRT_2PI


def glu_backward_ref(grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                     act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_gate, grad_up) of h = act(gate) * up in closed form, float32 (float64 stays) math, input dtype out."""
    _check_act(act)
    compute = torch.promote_types(gate.dtype, torch.float32)
    g, u, gh = gate.to(compute), up.to(compute), grad_h.to(compute)
    a, da = _act_and_grad(g, act)
    return (gh * u * da).to(gate.dtype), (gh * a).to(up.dtype)


# -------------------------------------------------------------------------------------------------- kernels


@jit
def tanh_f32(u):
    """tanh in float32 to a few ulp everywhere (triton.language has no tanh).

    |u| >= 1/8: (1 - e) / (1 + e), e = exp(-2|u|) (no overflow, exact limits +-1); |u| < 1/8: the odd Taylor
    series to u^7 (relative error < 2e-9), which avoids the cancellation in 1 - e near 0.
    """
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    u2 = u * u
    small = a * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 + u2 * -0.05396825396825397)))
    r = tl.where(a < 0.125, small, big)
    return tl.where(u < 0.0, -r, r)


@jit
def _act_fwd(g, ACT: tl.constexpr):
    if ACT == 0:
        a = g * tl.sigmoid(g)
    elif ACT == 1:
        t = tanh_f32(0.7978845608028654 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
    else:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    return a


@jit
def _act_fwd_bwd(g, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        t = tanh_f32(0.7978845608028654 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    return a, da


@jit
def _glu_fwd_kernel(g_ptr, u_ptr, h_ptr, n_cols, g_stride, u_stride, n_col_blocks,
                    ACT: tl.constexpr, BLOCK: tl.constexpr):
    # one program: BLOCK columns of one row; rows may be strided in gate/up, h is contiguous (rows, n_cols)
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    h = _act_fwd(g, ACT) * u
    tl.store(h_ptr + row * n_cols + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@jit
def _glu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n_cols, dh_stride, g_stride, u_stride, dg_stride,
                    du_stride, n_col_blocks, ACT: tl.constexpr, BLOCK: tl.constexpr):
    # dg and du may be g and u themselves (in place): each element is read before the program writes it
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dh = tl.load(dh_ptr + row * dh_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_fwd_bwd(g, ACT)
    tl.store(dg_ptr + row * dg_stride + cols, (dh * u * da).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * du_stride + cols, (dh * a).to(du_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launchers


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a (rows, cols) view with contiguous columns (any row stride), copying only when no such view exists."""
    cols = x.shape[-1] if x.dim() else 1
    if x.dim() == 0 or x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, cols)  # (rows, cols), row stride kept, e.g. 2I for a half of gate_up
    except RuntimeError:  # leading dims not viewable as one
        return x.contiguous().view(-1, cols)


def _use_kernel(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype or t.device != first.device for t in tensors[1:]):
        if dispatch.mode() != "ref":
            dispatch.fallback("glu", "gate, up (and grad) differ in shape, dtype or device")
        return False
    return dispatch.use_triton("glu", *tensors, dtypes=KERNEL_DTYPES)


def _launch_shape(x2: torch.Tensor) -> tuple[int, int, int]:
    n_rows, n_cols = x2.shape
    block = min(_BLOCK, max(16, next_power_of_2(n_cols)))
    return block, cdiv(n_cols, block), n_rows * cdiv(n_cols, block)


def glu_forward(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """h = act(gate) * up in gate's shape and dtype (contiguous), without autograd.

    Triton when dispatch allows it, otherwise glu_ref under no_grad.
    """
    _check_act(act)
    if not _use_kernel(gate, up):
        with torch.no_grad():
            return glu_ref(gate, up, act)
    g2, u2 = _rows(gate), _rows(up)  # (rows, cols) each
    h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if h.numel() == 0:
        return h
    block, n_col_blocks, grid = _launch_shape(g2)
    _glu_fwd_kernel[(grid,)](g2, u2, h, g2.shape[1], g2.stride(0), u2.stride(0), n_col_blocks,
                             ACT=ACTS[act], BLOCK=block, num_warps=4)
    return h


def glu_backward(grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str,
                 inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_gate, grad_up) of h = act(gate) * up, in gate's shape and dtype, without autograd.

    Triton when dispatch allows it, otherwise glu_backward_ref (closed form, float32 math). Contiguous new
    tensors, or with inplace=True gate and up themselves, overwritten (a caller that needs their values no more
    saves two (rows, cols) buffers: the LoRA MLP's backward, where they are the peak of a layer's).
    """
    _check_act(act)
    if not _use_kernel(gate, up, grad_h):
        with torch.no_grad():
            grads = glu_backward_ref(grad_h, gate, up, act)
            return (gate.copy_(grads[0]), up.copy_(grads[1])) if inplace else grads
    dh2, g2, u2 = _rows(grad_h), _rows(gate), _rows(up)  # (rows, cols) each
    if inplace:  # g2 and u2 are views of gate and up, unless _rows had to copy: then these copies get the result
        grad_gate, grad_up, dg2, du2 = g2.view(gate.shape), u2.view(up.shape), g2, u2
    else:
        grad_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        grad_up = torch.empty_like(grad_gate)
        dg2, du2 = _rows(grad_gate), _rows(grad_up)
    if grad_gate.numel() == 0:
        return grad_gate, grad_up
    block, n_col_blocks, grid = _launch_shape(g2)
    _glu_bwd_kernel[(grid,)](dh2, g2, u2, dg2, du2, g2.shape[1], dh2.stride(0), g2.stride(0), u2.stride(0),
                             dg2.stride(0), du2.stride(0), n_col_blocks, ACT=ACTS[act], BLOCK=block, num_warps=4)
    return grad_gate, grad_up


class _GluFunction(torch.autograd.Function):
    """h = act(gate) * up; saves gate and up (not act(gate)): backward recomputes the activation."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return glu_forward(gate, up, act)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = glu_backward(grad_h, gate, up, ctx.act)
        return (grad_gate if ctx.needs_input_grad[0] else None,
                grad_up if ctx.needs_input_grad[1] else None, None)


def glu(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up (act: "silu", "gelu_tanh" or "gelu"), differentiable; Triton or the reference per dispatch."""
    _check_act(act)
    if _use_kernel(gate, up):
        return _GluFunction.apply(gate, up, act)
    return glu_ref(gate, up, act)
