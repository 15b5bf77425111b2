"""Triton pieces shared by the grouped-product kernels (gazelle.kernels.multi_linear, the NF4 kernel of
gazelle.kernels.nf4): several weights over one input in one launch, each program one (BN, BM) tile of one weight.

- pick: the argument of the weight a tile belongs to. Weight i's tiles follow weight i-1's; the launcher passes
  the first tile of weights 1, 2, 3 (t_1 <= t_2 <= t_3; an absent weight's offset is past the grid) and a program
  compares its tile index with them: scalar selects, no tile straddles two weights.
- finish: bias or activation, the K-split reduction and the store. With SPLIT > 1 each program writes its float32
  partial; the tile's last program (counted atomically) adds the partials in split order, so the result does not
  depend on which program finishes last, resets the counter for the next launch, and writes y: one launch, no
  reduction kernel, no memset (the counters are gazelle.kernels.launch.split_counters').

Layouts: y (M, y_cols) holds each weight's columns after the previous weight's (glu: act(gate) * up, I columns);
partial (SPLIT, M, p_cols) float32 holds every weight's columns the same way (glu: gate's I, then up's I).
"""

from __future__ import annotations

from gazelle.kernels._triton import jit, tl
from gazelle.kernels.glu import _act_fwd


@jit
def pick(pid, t1, t2, t3, a0, a1, a2, a3):
    """a_i of the weight i that output tile pid belongs to: tiles [0, t1) are weight 0's, [t1, t2) weight 1's, ..."""
    return tl.where(pid >= t3, a3, tl.where(pid >= t2, a2, tl.where(pid >= t1, a1, a0)))


@jit
def _sum_splits(partial_ptr, offs, mask, split_stride, SPLIT: tl.constexpr):
    """The SPLIT float32 partials at offs, added in split order; .cg reads them from L2, where the others wrote."""
    out = tl.load(partial_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, SPLIT):
        out += tl.load(partial_ptr + s * split_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return out


@jit
def _epilogue(acc, acc_u, y_ptr, y_offs, mask, b_ptr, rn, bias_mask, HAS_BIAS: tl.constexpr, GLU: tl.constexpr,
              ACT: tl.constexpr):
    """y = acc + bias, or act(acc) * acc_u, rounded once to y's dtype."""
    out = acc
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=bias_mask, other=0.0).to(tl.float32)[:, None]
    if GLU:
        out = _act_fwd(acc, ACT) * acc_u
    tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def finish(acc, acc_u, y_ptr, y_offs, mask, b_ptr, rn, bias_mask, partial_ptr, p_offs, split_stride, up_offset,
           counter_ptr, tile, pid_k, HAS_BIAS: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr,
           SPLIT: tl.constexpr):
    """Write one (BN, BM) tile of y from this program's float32 acc (and acc_u, up's, when GLU).

    y_offs / p_offs: the tile's offsets in y and in one split of partial (split_stride elements apart); up's
    partial columns start up_offset after gate's. tile: the counter of this output tile, pid_k: this K split.
    """
    if SPLIT == 1:
        _epilogue(acc, acc_u, y_ptr, y_offs, mask, b_ptr, rn, bias_mask, HAS_BIAS, GLU, ACT)
    else:
        tl.store(partial_ptr + pid_k * split_stride + p_offs, acc, mask=mask)
        if GLU:
            tl.store(partial_ptr + pid_k * split_stride + up_offset + p_offs, acc_u, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        done = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT - 1:
            acc = _sum_splits(partial_ptr, p_offs, mask, split_stride, SPLIT)
            if GLU:
                acc_u = _sum_splits(partial_ptr + up_offset, p_offs, mask, split_stride, SPLIT)
            tl.atomic_xchg(counter_ptr + tile, 0)  # zero again for the next launch
            _epilogue(acc, acc_u, y_ptr, y_offs, mask, b_ptr, rn, bias_mask, HAS_BIAS, GLU, ACT)
