"""RMSNorm over the last dimension: a Triton forward/backward beside the plain-torch reference.

y = x * rsqrt(mean(x^2) + eps) * s, s = weight (llama form, offset 0) or offset + weight (gemma form).
The reference is exactly `gazelle.models.decoder.rms_norm`; the kernel reproduces its roundings:
- llama form: the normalised x is rounded to x.dtype, then multiplied by the weight in the promoted dtype
  (bf16 * bf16 is formed in float32 and rounded once, as torch does), so 16-bit outputs match bit for bit
  up to the order of the sum of squares;
- gemma form: (offset + weight) * normalised x is formed in float32 and rounded once to x.dtype.

The forward saves the per-row rstd (float32) so the backward does not redo the reduction. The weight gradient
is summed per program into a float32 (programs, hidden) buffer that torch then sums: deterministic, no atomics.
"""

from __future__ import annotations

import torch

from gazelle.kernels import dispatch
from gazelle.kernels._triton import cdiv, jit, next_power_of_2, tl

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HIDDEN = 65536  # one row is held in registers; wider rows run the reference
BWD_PROGRAMS_PER_SM = 2  # measured on an H100: 2 per SM beat 1, 4 and 8 (kernel + partial sum)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x (..., H), weight (H,): the oracle, the same computation as gazelle.models.decoder.rms_norm."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (offset + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


@jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, eps, offset,
                  BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, OFFSET_FORM: tl.constexpr):
    """One program normalises BLOCK_ROWS rows of the contiguous (n_rows, n_cols) x."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]  # (BLOCK_ROWS, BLOCK_N)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_ROWS,)
    normed = x * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if OFFSET_FORM:
        y = normed * (offset + w)[None, :]
    else:  # round the normalised x to x's dtype first, as the reference does
        y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@jit
def _rms_norm_bwd(x_ptr, w_ptr, g_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, offset,
                  BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, OFFSET_FORM: tl.constexpr,
                  WEIGHT_GRAD: tl.constexpr):
    """Each program walks row blocks pid, pid + P, ...; writes dx rows and its dweight partial sum (row pid)."""
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if OFFSET_FORM:
        scale = offset + w
    else:
        scale = w
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * BLOCK_ROWS, n_rows, n_progs * BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]  # (BLOCK_ROWS, BLOCK_N)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        normed = x * rstd[:, None]
        dn = g * scale[None, :]
        mean_dn_n = tl.sum(dn * normed, axis=1) / n_cols  # (BLOCK_ROWS,)
        dx = rstd[:, None] * (dn - normed * mean_dn_n[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            if OFFSET_FORM:
                dw += tl.sum(g * normed, axis=0)
            else:  # the weight multiplied the normalised x rounded to x's dtype
                dw += tl.sum(g * normed.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
    if WEIGHT_GRAD:
        tl.store(dw_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)


def _tiling(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_N, num_warps): a tile of about 4k elements or one whole row if that is wider."""
    block_n = next_power_of_2(n_cols)
    block_rows = max(1, min(64, 4096 // block_n))
    tile = block_rows * block_n
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    return block_rows, block_n, num_warps


def _n_programs(device: torch.device, n_blocks: int) -> int:
    """Programs of the backward: a few per SM on a GPU (each loops over row blocks), a handful in the interpreter."""
    if device.type == "cuda":
        per_device = BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        per_device = 4
    return max(1, min(n_blocks, per_device))


class _RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm.

    Backward, with n = x * r, r = (mean(x^2) + eps)^-1/2, s = weight or offset + weight, g = dL/dy, H = hidden:
        dL/dn = g * s
        dx = r * (dL/dn - n * mean(dL/dn * n))          (row-wise mean over H)
        dweight = sum over rows of g * n                (n rounded to x.dtype in the llama form, as it was used)
    """

    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        shape = x.shape
        n_cols = shape[-1]
        x2 = x.contiguous().view(-1, n_cols)  # (rows, H)
        n_rows = x2.shape[0]
        out_dtype = x.dtype if offset else torch.promote_types(weight.dtype, x.dtype)
        w = weight.contiguous()
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_rows, block_n, num_warps = _tiling(n_cols)
        if n_rows:
            _rms_norm_fwd[(cdiv(n_rows, block_rows),)](
                x2, w, y, rstd, n_rows, n_cols, float(eps), float(offset),
                BLOCK_ROWS=block_rows, BLOCK_N=block_n, OFFSET_FORM=bool(offset), num_warps=num_warps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape, ctx.offset, ctx.weight_dtype = shape, float(offset), weight.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, grad):
        x2, w, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        g = grad.contiguous().view(n_rows, n_cols)  # (rows, H)
        dx = torch.empty_like(x2)
        weight_grad = ctx.needs_input_grad[1]
        block_rows, block_n, num_warps = _tiling(n_cols)
        n_progs = _n_programs(x2.device, cdiv(n_rows, block_rows))
        partial = torch.empty((n_progs, n_cols) if weight_grad else (1, 1), dtype=torch.float32, device=x2.device)
        if n_rows:
            _rms_norm_bwd[(n_progs,)](
                x2, w, g, rstd, dx, partial, n_rows, n_cols, ctx.offset,
                BLOCK_ROWS=block_rows, BLOCK_N=block_n, OFFSET_FORM=bool(ctx.offset), WEIGHT_GRAD=weight_grad,
                num_warps=num_warps)
        dweight = None
        if weight_grad:
            dweight = (partial.sum(0) if n_rows else torch.zeros(n_cols, device=x2.device)).to(ctx.weight_dtype)
        return dx.view(ctx.shape), dweight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of x (..., H) by weight (H,): Triton on GPU (or when GAZELLE_KERNELS=triton), else the reference.

    Output dtype as the reference: x.dtype with an offset, the promotion of weight and x without.
    """
    if dispatch.use_triton("rms_norm", x, weight, dtypes=KERNEL_DTYPES):
        if weight.dtype not in KERNEL_DTYPES:
            dispatch.fallback("rms_norm", f"no kernel for a {weight.dtype} weight")
        elif weight.dim() != 1 or weight.shape[0] != x.shape[-1] or x.dim() == 0:
            dispatch.fallback("rms_norm", f"weight {tuple(weight.shape)} is not (hidden,) of x {tuple(x.shape)}")
        elif x.shape[-1] > MAX_HIDDEN:
            dispatch.fallback("rms_norm", f"hidden size {x.shape[-1]} > {MAX_HIDDEN}")
        else:
            return _RMSNormFunction.apply(x, weight, eps, offset)
    return rms_norm_ref(x, weight, eps, offset)
