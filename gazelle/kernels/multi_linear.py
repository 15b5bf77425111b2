"""The linear layers of one input as one kernel launch, for decode-sized inputs: qkv, and gate/up with the GLU.

    multi_linear(x, [W_1, .., W_n], [b_1, .., b_n]) = [x W_1^T + b_1 | .. | x W_n^T + b_n]    (..., sum N_i)
    glu_linear(x, G, U, act)                        = act(x G^T) * (x U^T)                    (..., I)

x (..., K) float32/bfloat16/float16, each W_i (N_i, K) in x's dtype, 1 to 4 of them, b_i (N_i,) or None; G and U
(I, K). The weights stay separate tensors (a concatenated copy would cost their memory again): the kernel picks
its weight per program. glu_linear writes neither x G^T nor x U^T (only their float32 partial sums when K is
split); act is a name of gazelle.kernels.glu.ACTS, with its formulas (silu, gelu tanh, gelu erf) in float32.

Why: in the CUDA-graph decode step (M = 1..64 rows of x, the batch) cuBLAS runs q, k and v as three GEMMs and
gate and up as two. On an H100 (llama-8B, M=32) q_proj streams its weight at 2.25 TB/s, k_proj and v_proj at
1.4 TB/s plus a split-K reduction kernel each, gate and up at 2.7 TB/s: small GEMMs leave SMs idle and each
launch has its latency. One launch over all the weights of a group keeps every SM streaming.

The kernel (M <= MAX_M), grid (output tiles, K splits):
- x fits one tile of BM = max(16, next_power_of_2(M)) rows. Output tile t covers BN rows of one weight: weight
  i's tiles follow weight i-1's (tile offsets t_1 <= t_2 <= t_3 passed as scalars; no tile straddles two
  weights), and a program selects its weight pointer, N, bias and first output column by comparing its tile
  index with the offsets (scalar selects). glu_linear: tile t covers rows t*BN.. of G and of U, multiplied in
  the same loop over one load of x; act(gate) * up is taken on the float32 accumulators in the epilogue.
- an iteration loads a (BN, BK) tile of W (rows of BK contiguous elements: 16-byte loads) and the (BM, BK)
  tile of x and accumulates tl.dot(W, x^T) (BN, BM) in float32: W is the MMA's first operand (its 64 rows per
  warp group on Hopper), the few rows of x the narrow second. Triton pipelines the loop over num_stages
  shared-memory buffers. Rows past N (the ragged last tile of a weight) and past M are clamped to the last row
  on load, so loads need no masks, and masked on store.
- K split: when the tiles are too few to keep every SM streaming, K is split; each program writes its float32
  partial and the tile's last program (an atomic counter) adds the partials in split order (deterministic),
  adds the bias or applies the activation and writes y: one launch, no reduction kernel, no memset (the
  weight selection and this epilogue are gazelle.kernels.grouped's, shared with the grouped NF4 kernel).
Everything is CUDA-graph capturable: no host sync, launch parameters from shapes only; the split-K counters are
made by the first, eager call. config() holds the tile rule; benchmarks/multi_linear.py times it against cuBLAS
and sweeps alternatives. Not yet timed on a GPU; compiled offline for sm_90 (Triton 3.9, ptxas): the loads are
16-byte cp.async into shared memory, the products wgmma m64nBMk16 (mma.sync at BN = 32), 64-96 KB of shared
memory and no register spills at the default configs.
Numerics: float32 accumulation, bias added and act(gate) * up taken in float32, one rounding to x's dtype; so a
16-bit result is closer to the float32 reference than the 16-bit reference (which rounds gate and up first) is.

Elsewhere the reference runs: M > MAX_M (prefill, training: cuBLAS's GEMMs are compute bound there and good),
no triton or CPU tensors without the interpreter (dispatch decides), or gradients needed (the kernel is
inference only; the reference is differentiable). multi_linear and glu_linear are also torch custom ops
(gazelle::multi_linear, gazelle::glu_linear) that a torch.compile'd decode step keeps as opaque calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F

from gazelle.kernels import dispatch
from gazelle.kernels._triton import cdiv, jit, next_power_of_2, tl
from gazelle.kernels.glu import ACTS, glu_ref
from gazelle.kernels.grouped import finish, pick
from gazelle.kernels.launch import sm_count, split_counters

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_M = 64  # rows of x up to which the kernel runs; above, the reference (cuBLAS)
MAX_WEIGHTS = 4  # weights of one multi_linear call (the kernel's pointer arguments)
SMEM_BUDGET = 100 << 10  # shared memory of one program's pipeline buffers: two programs fit an SM (228 KB on an H100)


# ---------------------------------------------------------------------------------------------------- references


def multi_linear_ref(x: torch.Tensor, weights: Sequence[torch.Tensor],
                     biases: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """torch.cat([F.linear(x, W_i, b_i) ...], -1) in x's dtype (biases cast to it); differentiable."""
    biases = [None] * len(weights) if biases is None else biases
    return torch.cat([F.linear(x, w, None if b is None else b.to(x.dtype)) for w, b in zip(weights, biases)], -1)


def glu_linear_ref(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, act: str) -> torch.Tensor:
    """glu_ref(x G^T, x U^T, act): the decoder's MLP before its down projection; differentiable."""
    return glu_ref(F.linear(x, gate_w), F.linear(x, up_w), act)


# ---------------------------------------------------------------------------------------------------- kernel


@jit
def _dots(x_ptr, w_ptr, u_ptr, rm, rn, K, stride_xm, k_begin, k_end, BM: tl.constexpr, BN: tl.constexpr,
          BK: tl.constexpr, GLU: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """(W[rn, k_begin:k_end] @ x[rm, k_begin:k_end]^T, the same with U when GLU), each (BN, BM) float32."""
    rk = tl.arange(0, BK)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BM, 1)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K  # (BN, 1)
    u_rows = u_ptr + rn.to(tl.int64)[:, None] * K
    acc = tl.zeros((BN, BM), tl.float32)
    acc_u = tl.zeros((BN, BM), tl.float32)
    for k in range(k_begin, k_end, BK):
        cols = (k + rk)[None, :]  # (1, BK)
        if EVEN_K:
            x = tl.load(x_rows + cols)
            w = tl.load(w_rows + cols)
        else:
            x = tl.load(x_rows + cols, mask=cols < K, other=0.0)
            w = tl.load(w_rows + cols, mask=cols < K, other=0.0)
        xt = tl.trans(x)  # (BK, BM)
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)
        if GLU:
            if EVEN_K:
                u = tl.load(u_rows + cols)
            else:
                u = tl.load(u_rows + cols, mask=cols < K, other=0.0)
            acc_u = tl.dot(u, xt, acc_u, input_precision=PRECISION)
    return acc, acc_u


@jit
def _multi_linear_kernel(x_ptr, y_ptr, partial_ptr, counter_ptr, w0, w1, w2, w3, b0, b1, b2, b3, n0, n1, n2, n3,
                         t1, t2, t3, M, K, stride_xm, split_len,
                         BIAS: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                         PRECISION: tl.constexpr):
    """One (BN, BM) tile of y^T and one K split; grid (output tiles, SPLIT).

    multi_linear: y (M, n0 + .. + n3) = x @ [w0; ..; w3]^T + [b0 | ..], weights of n_i = 0 rows unused; BIAS has
    bit i set when b_i exists (the other b_i are stand-ins never read). GLU: y (M, n0) = act(x w0^T) * (x w1^T),
    n1 = n0. partial (SPLIT, M, n0 + .. + n3) float32 when SPLIT > 1 (GLU: gate's columns, then up's).
    """
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    p_cols = n0 + n1 + n2 + n3  # columns of partial
    if GLU:
        w_ptr, b_ptr, n, first, col, y_cols, n_bias = w0, b0, n0, 0, 0, n0, 0
    else:
        w_ptr = pick(pid, t1, t2, t3, w0, w1, w2, w3)
        b_ptr = pick(pid, t1, t2, t3, b0, b1, b2, b3)
        n = pick(pid, t1, t2, t3, n0, n1, n2, n3)
        first = pick(pid, t1, t2, t3, 0, t1, t2, t3)  # the weight's first tile
        col = pick(pid, t1, t2, t3, 0, n0, n0 + n1, n0 + n1 + n2)  # the weight's first column in y
        # the bias's rows: n, or 0 for a weight without bias
        n_bias = pick(pid, t1, t2, t3, n0 * (BIAS & 1), n1 * ((BIAS >> 1) & 1), n2 * ((BIAS >> 2) & 1),
                      n3 * ((BIAS >> 3) & 1))
        y_cols = p_cols
    rn = (pid - first) * BN + tl.arange(0, BN)  # (BN,) rows of the weight
    rm = tl.arange(0, BM)  # (BM,) rows of x
    mask_n, mask_m = rn < n, rm < M
    mask = mask_n[:, None] & mask_m[None, :]  # (BN, BM)
    k_begin = pid_k * split_len  # a whole number of BK iterations, never empty
    k_end = tl.minimum(k_begin + split_len, K)
    acc, acc_u = _dots(x_ptr, w_ptr, w1, tl.minimum(rm, M - 1), tl.minimum(rn, n - 1), K, stride_xm, k_begin,
                       k_end, BM, BN, BK, GLU, EVEN_K, PRECISION)
    y_offs = rm[None, :] * y_cols + (col + rn)[:, None]  # (BN, BM) offsets in y (M, y_cols)
    p_offs = rm[None, :] * p_cols + (col + rn)[:, None]  # (BN, BM) offsets in partial[s] (M, p_cols)
    finish(acc, acc_u, y_ptr, y_offs, mask, b_ptr, rn, rn < n_bias, partial_ptr, p_offs, M * p_cols, n0,
           counter_ptr, pid, pid_k, BIAS != 0, GLU, ACT, SPLIT)

# ---------------------------------------------------------------------------------------------------- launcher


def stage_bytes(bm: int, bn: int, bk: int, glu: bool, dtype: torch.dtype) -> int:
    """Shared memory of one pipeline stage: the (BN, BK) tile of W (of G and U for glu) and the (BM, BK) tile of x."""
    return (bn * (2 if glu else 1) + bm) * bk * dtype.itemsize


def config(M: int, Ns: Sequence[int], K: int, device: torch.device, glu: bool = False,
           dtype: torch.dtype = torch.bfloat16, sms: int | None = None) -> dict:
    """Tiles, K split, warps and stages of the kernel for x (M, K), M <= MAX_M, and weights of Ns rows.

    glu: Ns = (I, I), and a program streams a tile of each. sms: the SMs to plan for (default: the device's).
    From bandwidth arithmetic for the H100 (132 SMs, 228 KB of shared memory an SM), the split then set by
    benchmarks/multi_linear.py's sweep (H100, 2026-11-22):
    - BM = max(16, next_power_of_2(M)): x in one tile, 16 rows at least (tl.dot's least);
    - BN = 64 weight rows a tile (one Hopper wgmma's rows), 32 where 64 leaves fewer tiles than half the SMs
      (qwen-1.5B's qkv: 32 tiles of 64);
    - BK = 128 columns (256 bytes of a bf16 row: 16 loads of 16 bytes), halved while fewer than 3 pipeline
      stages (stage_bytes) fit SMEM_BUDGET, so that two programs share an SM with 2-3 tiles in flight each;
      num_stages = the stages that fit, 2 to 4; 4 warps;
    - split = as many as keep tiles * split <= SMs (one program an SM; each split at least 4 iterations, at most
      16). Splitting up to two programs an SM was slower: llama-8B qkv at M=32 took 23.6 us with 2 splits and
      20.3 us with none (cuBLAS: 30.7); qwen-1.5B qkv 7.1 us with 3 and 6.6 with none (cuBLAS: 16.5).
    Shapes of the module docstring's profile, 132 SMs: llama-8B qkv (BN 64, BK 128, no split: 96 programs),
    gate/up (64, 64, no split: 224); qwen-1.5B qkv (32, 128, split 2: 128), gate/up (64, 64, no split: 140).
    """
    bm = max(16, next_power_of_2(M))
    sms = sms or sm_count(device)

    def tiles(bn: int) -> int:
        return cdiv(Ns[0], bn) if glu else sum(cdiv(n, bn) for n in Ns)

    bn = 64 if tiles(64) * 2 >= sms else 32
    bk = max(16, min(128, next_power_of_2(K)))
    while SMEM_BUDGET // stage_bytes(bm, bn, bk, glu, dtype) < 3 and bk > 32:
        bk //= 2
    stages = max(2, min(4, SMEM_BUDGET // stage_bytes(bm, bn, bk, glu, dtype)))
    split = max(1, min(16, sms // tiles(bn), cdiv(K, bk) // 4))
    return {"BM": bm, "BN": bn, "BK": bk, "split": split, "num_warps": 4, "num_stages": stages}


def multi_linear_fused(x2: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                       act: str | None = None, cfg: dict | None = None) -> torch.Tensor:
    """The kernel: y (M, sum N_i) for multi_linear, or (M, I) for glu_linear (act given: weights = (G, U)).

    x2 (M, K) with M <= MAX_M; weights contiguous in x2's dtype. cfg overrides config()'s entries.
    """
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    (M, K), ns, glu = x2.shape, [w.shape[0] for w in weights], act is not None
    cfg = config(M, ns, K, x2.device, glu, x2.dtype) | (cfg or {})
    bn, bk = cfg["BN"], cfg["BK"]
    tiles = [cdiv(ns[0], bn)] if glu else [cdiv(n, bn) for n in ns]
    grid_n = sum(tiles)
    offsets = list(accumulate(tiles))[:-1]  # first tile of weights 1, 2, ..
    offsets += [grid_n] * (3 - len(offsets))  # absent weights: past the last tile, never picked
    iters = cdiv(K, bk)
    per_split = cdiv(iters, cfg["split"])
    split = cdiv(iters, per_split)  # no empty splits
    y = torch.empty(M, ns[0] if glu else sum(ns), dtype=x2.dtype, device=x2.device)
    partial = torch.empty(split, M, sum(ns), dtype=torch.float32, device=x2.device) if split > 1 else y
    counters = split_counters(x2.device, grid_n) if split > 1 else y
    pad = MAX_WEIGHTS - len(weights)
    ws = [*weights, *[weights[0]] * pad]
    bs = [x2 if b is None else b.to(x2.dtype) for b in biases] + [x2] * pad  # x2: a stand-in never read
    bias_bits = sum(1 << i for i, b in enumerate(biases) if b is not None)
    _multi_linear_kernel[(grid_n, split)](
        x2, y, partial, counters, *ws, *bs, *ns, *[0] * pad, *offsets, M, K, x2.stride(0), per_split * bk,
        BIAS=bias_bits, GLU=glu, ACT=ACTS[act] if glu else 0, BM=cfg["BM"], BN=bn, BK=bk, SPLIT=split,
        EVEN_K=K % bk == 0, PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def _use_kernel(op: str, x2: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    if not 0 < x2.shape[0] <= MAX_M:
        return False  # by design: cuBLAS for prefill-sized inputs
    if not dispatch.use_triton(op, x2, *weights, dtypes=KERNEL_DTYPES):
        return False
    if not all(w.is_contiguous() for w in weights):
        dispatch.fallback(op, "a weight is not contiguous (the kernel reads whole rows; a copy would cost what it "
                              "saves)")
        return False
    return True


def _multi_linear(x, weights, biases) -> torch.Tensor:
    K = x.shape[-1]
    x2 = x.reshape(-1, K)  # (M, K)
    if _use_kernel("multi_linear", x2, weights):
        y2 = multi_linear_fused(x2, weights, biases)
        return y2.view(*x.shape[:-1], y2.shape[1])
    return multi_linear_ref(x, weights, biases)


def _glu_linear(x, gate_w, up_w, act) -> torch.Tensor:
    K = x.shape[-1]
    x2 = x.reshape(-1, K)  # (M, K)
    if _use_kernel("glu_linear", x2, (gate_w, up_w)):
        y2 = multi_linear_fused(x2, (gate_w, up_w), (None, None), act)
        return y2.view(*x.shape[:-1], y2.shape[1])
    return glu_linear_ref(x, gate_w, up_w, act)


# ---------------------------------------------------------------------------------------------------- public ops


def _check(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> None:
    if not 1 <= len(weights) <= MAX_WEIGHTS:
        raise ValueError(f"multi_linear takes 1 to {MAX_WEIGHTS} weights, got {len(weights)}")
    if len(biases) != len(weights):
        raise ValueError(f"multi_linear: {len(biases)} biases for {len(weights)} weights (None for no bias)")
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"multi_linear: weight {i} {tuple(w.shape)} does not match x {tuple(x.shape)}: "
                             "weights are (N_i, K) for x (..., K)")
        if w.dtype != x.dtype:
            raise ValueError(f"multi_linear: weight {i} is {w.dtype}, x {x.dtype}: cast x to the weights' dtype")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"multi_linear: bias {i} {tuple(b.shape)} does not match weight {i} {tuple(w.shape)}")


def _check_glu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTS)}")
    if gate_w.shape != up_w.shape:
        raise ValueError(f"glu_linear: gate {tuple(gate_w.shape)} and up {tuple(up_w.shape)} differ in shape")
    _check(x, (gate_w, up_w), (None, None))


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def multi_linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """[x W_1^T + b_1 | .. | x W_n^T + b_n] (..., sum N_i) in x's dtype, for x (..., K) and 1 to 4 weights (N_i, K).

    The kernel of the module docstring for up to MAX_M rows, else multi_linear_ref; the reference too when a
    gradient is needed (the kernel is inference only). Under torch.compile: the custom op gazelle::multi_linear.
    """
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    _check(x, weights, biases)
    if _needs_grad(x, *weights, *biases):
        return multi_linear_ref(x, weights, biases)
    if torch.compiler.is_compiling():
        return torch.ops.gazelle.multi_linear(x, weights, biases)  # opaque: the kernel runs when the graph runs
    return _multi_linear(x, weights, biases)


def glu_linear(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, act: str) -> torch.Tensor:
    """act(x G^T) * (x U^T) (..., I) in x's dtype, for x (..., K), G and U (I, K); act a name of glu.ACTS.

    The kernel of the module docstring for up to MAX_M rows (gate and up in float32, never written), else
    glu_linear_ref; the reference too when a gradient is needed. Under torch.compile: gazelle::glu_linear.
    """
    _check_glu(x, gate_w, up_w, act)
    if _needs_grad(x, gate_w, up_w):
        return glu_linear_ref(x, gate_w, up_w, act)
    if torch.compiler.is_compiling():
        return torch.ops.gazelle.glu_linear(x, gate_w, up_w, act)
    return _glu_linear(x, gate_w, up_w, act)


@torch.library.custom_op("gazelle::multi_linear", mutates_args=())
def _multi_linear_op(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> torch.Tensor:
    """multi_linear for torch.compile (no gradient: the decode step)."""
    return _multi_linear(x, weights, biases)


@_multi_linear_op.register_fake
def _(x, weights, biases):
    _check(x, weights, biases)
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


@torch.library.custom_op("gazelle::glu_linear", mutates_args=())
def _glu_linear_op(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, act: str) -> torch.Tensor:
    """glu_linear for torch.compile (no gradient: the decode step)."""
    return _glu_linear(x, gate_w, up_w, act)


@_glu_linear_op.register_fake
def _(x, gate_w, up_w, act):
    _check_glu(x, gate_w, up_w, act)
    return x.new_empty((*x.shape[:-1], gate_w.shape[0]))
