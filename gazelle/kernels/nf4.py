"""NF4 weights on the GPU: dequantization, and y = x @ W^T read straight from the packed 4-bit weight.

Layout (gazelle/quant/nf4.py, bitsandbytes'): W (N, K) is flattened row-major; element e's code is the high
nibble of byte e // 2 when e is even, the low one when odd; its scale is absmax[e // blocksize] (decoded from
8 bits when double-quantized). W = level[code] * scale in float32, then one rounding to the compute dtype.

dequantize_nf4 / dequantize_nf4_into: one program decodes DEQUANT_BYTES packed bytes; bit for bit the
reference (float32 level * scale, then one cast; the double-quant scale as nested_map[code] * nested_absmax,
rounded, then + offset, rounded: launched with fp fusion off, so no FMA merges the two).

nf4_linear(x, q, bias), M = rows of x:
- M <= FUSED_MAX_M (decoding): one fused kernel streams the packed weight once and never writes W. Each
  iteration loads a tile of int32 words (16-byte loads), decodes it in registers and multiplies: for M == 1 by
  float32 products summed per chunk of one NF4 block and then scaled (a GEMV, fp fusion on), else by tl.dot on
  tensor cores with W rounded to x's dtype bit for bit as the reference's W. A tile spans several NF4 blocks;
  the next tile's loads are issued before the current one is decoded. When the grid of output tiles is too
  small, K is split and the last program of each tile (an atomic counter) adds the float32 partials in split
  order (deterministic), adds the bias and writes y: one launch, no reduction kernel, no memset.
- nf4_multi_linear(x, [q_1, ..], [b_1, ..]) and nf4_glu_linear(x, G, U, act), the decode step's q/k/v and
  gate/up: the same kernel over up to MAX_GROUP weights in one launch (gazelle.kernels.grouped: each program
  picks its weight's words, statistics and bias; glu streams a tile of G, then the same rows of U, and writes
  act(gate) * up). No weight is concatenated or copied. Small weights (qwen-1.5B's 256-row k/v) alone leave
  most SMs idle; in one launch with q they share the grid, and gate/up need no activation kernel.
- otherwise (prefill, training): W is dequantized into a temporary and F.linear (cuBLAS) multiplies.
- K not a multiple of the blocksize (rows do not start on a block), or a packed buffer not 4-byte aligned:
  the fused kernel cannot walk W by rows of words, so the dequantize kernel + F.linear run, logged once.
Everything is CUDA-graph capturable: no host syncs, no data-dependent Python branches; the split-K counters
(per device and stream, kept zero by the kernel) and nf4_levels(device) are made by the first, eager call.

The table lookup (the draft's bottleneck: a global-memory gather with 64-bit addresses, byte unpacking and
layout conversions, ~16 SASS instructions per weight element). Decoding is instruction bound: at the H100's
HBM rate an SM may spend ~5 issue slots per element. Options weighed:
- a tree of tl.where on the code bits: 15 selects + bit tests per element, worse than a load;
- an arithmetic formula: the levels are normal quantiles, no cheap exact formula exists;
- a 256-entry table of level pairs (one lookup per byte): 1-2 KB, which a warp's random lookups spread over
  8-16 cache lines (L1) or bank-conflicting words (shared memory): several times a 16-entry lookup's cost, and
  Triton cannot lay a table out per bank;
- chosen: the 16-entry float32 table held in shared memory by tl.gather on a (16,) tensor: a warp's lookups
  hit 16 distinct banks (equal codes broadcast), one conflict-free LDS each; the 8 codes of a word come out
  by shifts (no byte conversion), and ptxas folds extraction and address into (word >> (4i - 2)) & 0x3C and
  the LDS operand: 2 integer instructions + 1 LDS an element, ~6 instructions an element in all (sm_90 SASS).
Measured on an H100 (benchmarks/nf4_matmul.py, bf16, CUDA-graph replays, weights rotated past L2): M == 1
runs at 0.95-1.25 TB/s of packed weight on llama-8B's layers (24 us for 14336x4096), 1.3-1.8x faster than
dense bf16 F.linear and 2.3-4.8x faster than dequantize + F.linear on all seven layer shapes; ncu: ~55% of
issue slots busy, the rest mostly shared-memory (MIO) and dependency stalls at the 5 CTAs/SM the registers
allow. For 32 and 64 rows the tl.dot form (up to 0.67 TB/s) beats dequantize + F.linear on every shape but
qwen-1.5B's 256-row k/v at M=64 (10% slower), while dense bf16 F.linear is 1.0-1.7x faster than it.

The gradient wrt x (grad_y @ W, for LoRA training) dequantizes W again in backward instead of keeping it from
forward: one layer's W at a time. NF4 weights are frozen: no weight gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F

from gazelle.kernels import dispatch
from gazelle.kernels._triton import cdiv, jit, next_power_of_2, tl
from gazelle.kernels.glu import ACTS, glu
from gazelle.kernels.grouped import finish, pick
from gazelle.kernels.launch import sm_count, split_counters
from gazelle.quant.nf4 import NESTED_BLOCKSIZE, NF4Tensor, nf4_levels
from gazelle.quant.nf4 import dequantize_nf4 as dequantize_nf4_ref

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUSED_MAX_M = 64  # rows of x up to which nf4_linear runs the fused kernel; above, dequantize + cuBLAS
MAX_GROUP = 3  # NF4 weights of one grouped launch (q, k, v)
DEQUANT_BYTES = 1024  # packed bytes per program of the dequantize kernel (2048 elements)


# ---------------------------------------------------------------------------------------------------- kernels


@jit
def _scale(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, block, mask, DOUBLE_QUANT: tl.constexpr,
           NESTED: tl.constexpr):
    """float32 absmax of NF4 blocks `block` (any shape): q.absmax, or decoded from 8 bits in the reference's order."""
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED, mask=mask, other=0.0)
        scale = tl.load(nested_map_ptr + code) * nested + offset  # two roundings: launched with fp fusion off
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@jit
def _dequantize_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, levels_ptr, out_ptr,
                       numel, offset,
                       BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
                       BYTES: tl.constexpr):
    """out (numel,) = level[code] * scale, rounded once to out's dtype; BYTES packed bytes per program."""
    start = tl.program_id(0).to(tl.int64) * BYTES
    b = start + tl.arange(0, BYTES)  # (BYTES,) byte index
    in_range = b < (numel + 1) // 2
    byte = tl.load(packed_ptr + b, mask=in_range, other=0).to(tl.int32)
    level = tl.load(levels_ptr + tl.join(byte >> 4, byte & 15))  # (BYTES, 2): element 2b, then 2b + 1
    scale = _scale(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, b // (BLOCKSIZE // 2), in_range,
                   DOUBLE_QUANT, NESTED)  # both nibbles of a byte share a block: blocksizes are even
    value = tl.reshape(level * scale[:, None], (2 * BYTES,))  # float32, the reference's one rounding
    e = 2 * start + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + e, value.to(out_ptr.dtype.element_ty), mask=e < numel)


@jit
def _decode_words(words, table):
    """int32 words (...) -> float32 levels (..., 2, 2, 2); [..., a, b, h] is element 4a + 2b + h of its word.

    Byte j = 2a + b of a word (little endian) holds elements 2j (high nibble, h = 0) and 2j + 1 (low, h = 1), so
    reshaping the last three axes into 8 gives the word's elements in memory order. The lookup is a tl.gather
    from the 16-entry table, which Triton keeps in shared memory (see the module docstring).
    """
    by_byte = tl.join(tl.join(words, words >> 16), tl.join(words >> 8, words >> 24))  # [..., a, b]
    codes = tl.join((by_byte >> 4) & 15, by_byte & 15)  # [..., a, b, h]
    levels = tl.gather(table, tl.reshape(codes, (codes.numel,)), 0)
    return tl.reshape(levels, codes.shape)


@jit
def _load_tile(w_ptrs, x_ptrs, kw, k_end, word, chunk, cols, mask_n, mask_m, first_block, absmax_ptr,
               nested_absmax_ptr, nested_map_ptr, offset, WPB: tl.constexpr, BM: tl.constexpr, EVEN_K: tl.constexpr,
               DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr):
    """Operands of the iteration at word kw: words (BN, NC, CW), scales (BN, NC), x (BK,) float32 or (BM, BK).

    Without EVEN_K the last iteration of a row runs past K: its chunks past K load as 0 (scale 0, x 0).
    """
    if EVEN_K:
        mask_w = mask_n[:, None, None]
        mask_c = mask_n[:, None]
        mask_k = None
    else:
        mask_w = mask_n[:, None, None] & (kw + word < k_end)[None, :, :]
        mask_c = mask_n[:, None] & (kw + chunk < k_end)[None, :]
        mask_k = 8 * kw + cols < 8 * k_end
    w = tl.load(w_ptrs + kw, mask=mask_w, other=0)
    block = first_block[:, None] + (kw + chunk)[None, :] // WPB  # (BN, NC)
    scale = _scale(absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, block, mask_c, DOUBLE_QUANT, NESTED)
    if BM == 1:
        if EVEN_K:
            x = tl.load(x_ptrs + 8 * kw).to(tl.float32)
        else:
            x = tl.load(x_ptrs + 8 * kw, mask=mask_k, other=0.0).to(tl.float32)
    else:
        if EVEN_K:
            x = tl.load(x_ptrs + 8 * kw, mask=mask_m[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs + 8 * kw, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    return w, scale, x


@jit
def _stream(x_ptr, words_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, table, rn, rm, pid_m, mask_n,
            mask_m, stride_xm, row_words, k_begin, k_end,
            BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, NC: tl.constexpr, CW: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """x[rm] @ W[rn]^T over W's words [k_begin, k_end) of one NF4 weight: (BN, BM) float32 ((BN, 1) when BM == 1).

    An iteration takes a (BN, NC, CW) tile of int32 words: NC chunks of CW words (8 * CW columns), each chunk
    inside one NF4 block (CW divides the block's words), so a chunk's scale is one value. BM == 1: float32
    products summed per (row, chunk), then scaled. BM >= 16: W's tile rounded to x's dtype (the reference's W
    bit for bit) and tl.dot(W, x^T), W the MMA's first operand (BN >= 16 rows): one x row costs what 16 do.
    The next tile's loads are issued before this one is decoded (registers double-buffered by hand): 5-30%
    faster on an H100 than the plain loop, most on long rows (Triton's num_stages pipelining did not help).
    """
    WPB: tl.constexpr = BLOCKSIZE // 8  # int32 words per NF4 block
    BK: tl.constexpr = NC * CW * 8  # columns of W per iteration
    STEP: tl.constexpr = NC * CW  # words per iteration
    chunk = tl.arange(0, NC) * CW  # (NC,) first word of each chunk in the tile
    word = chunk[:, None] + tl.arange(0, CW)[None, :]  # (NC, CW) word of the tile
    k_last = k_begin + (k_end - k_begin - 1) // STEP * STEP  # the split's last iteration
    w_ptrs = words_ptr + rn.to(tl.int64)[:, None, None] * row_words + word[None, :, :]  # (BN, NC, CW) at k = 0
    first_block = rn.to(tl.int64) * (row_words // WPB)  # (BN,) block of W[n, 0]
    cols = tl.arange(0, BK)
    if BM == 1:
        x_ptrs = x_ptr + pid_m * stride_xm + cols  # (BK,) at k = 0
        acc = tl.zeros((BN, NC), tl.float32)
    else:
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + cols[None, :]  # (BM, BK) at k = 0
        acc = tl.zeros((BN, BM), tl.float32)
    w, scale, x = _load_tile(w_ptrs, x_ptrs, k_begin, k_end, word, chunk, cols, mask_n, mask_m, first_block,
                             absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, WPB, BM, EVEN_K, DOUBLE_QUANT,
                             NESTED)
    for kw in range(k_begin, k_end, STEP):
        # the next tile (the last one again at the end: a harmless in-bounds reload), in flight while this decodes
        w_next, scale_next, x_next = _load_tile(
            w_ptrs, x_ptrs, tl.minimum(kw + STEP, k_last), k_end, word, chunk, cols, mask_n, mask_m, first_block,
            absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset, WPB, BM, EVEN_K, DOUBLE_QUANT, NESTED)
        level = _decode_words(w, table)  # (BN, NC, CW, 2, 2, 2) float32
        if BM == 1:
            prod = level * tl.reshape(x, (NC, CW, 2, 2, 2))[None]
            acc += tl.sum(tl.reshape(prod, (BN, NC, CW * 8)), axis=2) * scale
        else:
            wt = tl.reshape(level * scale[:, :, None, None, None, None], (BN, BK)).to(x_ptr.dtype.element_ty)
            acc = tl.dot(wt, tl.trans(x), acc, input_precision=PRECISION)  # (BN, BM)
        w, scale, x = w_next, scale_next, x_next
    if BM == 1:
        out = tl.sum(acc, axis=1)[:, None]  # (BN, 1)
    else:
        out = acc
    return out  # one return: the compiler checks every return a specialization reaches against the others


@jit
def _fused_kernel(x_ptr, levels_ptr, y_ptr, partial_ptr, counter_ptr,
                  w0, w1, w2, a0, a1, a2, na0, na1, na2, nm0, nm1, nm2, f0, f1, f2, b0, b1, b2, n0, n1, n2, t1, t2,
                  M, stride_xm, row_words, split_words,
                  BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, BIAS: tl.constexpr,
                  GLU: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NC: tl.constexpr,
                  CW: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """One (BN, BM) tile of y and one K split over 1-3 NF4 weights of one K; grid (output tiles, M tiles, SPLIT).

    Weight i: packed words w_i, absmax a_i, nested absmax na_i, nested map nm_i, offset f_i, bias b_i (bit i of
    BIAS set when it exists), n_i rows; tiles [t_1, t_2) are weight 1's (gazelle.kernels.grouped.pick).
    Grouped: y (M, n0 + n1 + n2) = x @ [W0; W1; W2]^T + [b0 | b1 | b2]. GLU: y (M, n0) = act(x W0^T) * (x W1^T),
    n1 = n0, n2 = 0: a program streams its tile of W0, then the same rows of W1.
    """
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t3 = tl.num_programs(0)  # no fourth weight
    p_cols = n0 + n1 + n2  # columns of partial
    if GLU:
        words, absmax, nested_absmax, nested_map, offset = w0, a0, na0, nm0, f0
        b_ptr, n, first, col, y_cols, n_bias = b0, n0, 0, 0, n0, 0
    else:
        words = pick(pid_n, t1, t2, t3, w0, w1, w2, w2)
        absmax = pick(pid_n, t1, t2, t3, a0, a1, a2, a2)
        nested_absmax = pick(pid_n, t1, t2, t3, na0, na1, na2, na2)
        nested_map = pick(pid_n, t1, t2, t3, nm0, nm1, nm2, nm2)
        offset = pick(pid_n, t1, t2, t3, f0, f1, f2, f2)
        b_ptr = pick(pid_n, t1, t2, t3, b0, b1, b2, b2)
        n = pick(pid_n, t1, t2, t3, n0, n1, n2, n2)
        first = pick(pid_n, t1, t2, t3, 0, t1, t2, t2)  # the weight's first tile
        col = pick(pid_n, t1, t2, t3, 0, n0, n0 + n1, n0 + n1)  # the weight's first column in y
        # the bias's rows: n, or 0 for a weight without bias
        n_bias = pick(pid_n, t1, t2, t3, n0 * (BIAS & 1), n1 * ((BIAS >> 1) & 1), n2 * ((BIAS >> 2) & 1), 0)
        y_cols = p_cols
    rn = (pid_n - first) * BN + tl.arange(0, BN)  # (BN,) rows of the weight
    rm = pid_m * BM + tl.arange(0, BM)  # (BM,) rows of x
    mask_n, mask_m = rn < n, rm < M
    k_begin = pid_k * split_words  # in words; a split is a whole number of iterations, never empty
    k_end = tl.minimum(k_begin + split_words, row_words)
    table = tl.load(levels_ptr + tl.arange(0, 16))
    acc = _stream(x_ptr, words, absmax, nested_absmax, nested_map, offset, table, rn, rm, pid_m, mask_n, mask_m,
                  stride_xm, row_words, k_begin, k_end, BLOCKSIZE, DOUBLE_QUANT, NESTED, BM, BN, NC, CW, EVEN_K,
                  PRECISION)
    acc_u = acc
    if GLU:
        acc_u = _stream(x_ptr, w1, a1, na1, nm1, f1, table, rn, rm, pid_m, mask_n, mask_m, stride_xm, row_words,
                        k_begin, k_end, BLOCKSIZE, DOUBLE_QUANT, NESTED, BM, BN, NC, CW, EVEN_K, PRECISION)
    y_offs = rm.to(tl.int64)[None, :] * y_cols + (col + rn)[:, None]  # (BN, BM) offsets in y (M, y_cols)
    p_offs = rm.to(tl.int64)[None, :] * p_cols + (col + rn)[:, None]  # (BN, BM) offsets in partial[s]
    mask = mask_n[:, None] & mask_m[None, :]
    finish(acc, acc_u, y_ptr, y_offs, mask, b_ptr, rn, rn < n_bias, partial_ptr, p_offs, M * p_cols, n0,
           counter_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k, BIAS != 0, GLU, ACT, SPLIT)


# ---------------------------------------------------------------------------------------------------- launchers


def _stats(q: NF4Tensor):
    """(absmax, nested_absmax, nested_map, offset) as kernel arguments; unused pointers get a stand-in."""
    if q.double_quant:
        return q.absmax, q.nested_absmax, q.nested_quant_map, float(q.offset)
    return q.absmax, q.absmax, q.absmax, 0.0


def _dequantize_triton(q: NF4Tensor, out: torch.Tensor) -> torch.Tensor:
    """The dequantize kernel into a contiguous `out` of q.numel elements; no allocation, no host sync."""
    absmax, nested_absmax, nested_map, offset = _stats(q)
    packed = q.packed.reshape(-1)
    _dequantize_kernel[(cdiv(packed.numel(), DEQUANT_BYTES),)](
        packed, absmax, nested_absmax, nested_map, nf4_levels(q.device), out, q.numel, offset,
        BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.double_quant, NESTED=NESTED_BLOCKSIZE, BYTES=DEQUANT_BYTES,
        num_warps=4, enable_fp_fusion=False)
    return out


def fused_config(M: int, N: int | Sequence[int], K: int, blocksize: int, device: torch.device,
                 glu: bool = False, sms: int | None = None) -> dict:
    """Tiles, K split, warps and stages of the fused kernel for x (M, K), M <= FUSED_MAX_M, and weights (N_i, K).

    N: one weight's rows, or the rows of each weight of a group; glu: N = (I, I), a program streams a tile of each.
    From sweeps on an H100 (benchmarks/nf4_matmul.py --sweep; llama-8B and qwen-1.5B shapes; the chosen tile is
    within ~5% of the best one found for each shape):
    - M == 1, the GEMV form: BN = 8 rows, 512 words a tile (4 words, 16 bytes, a thread at 4 warps);
    - M >= 2: BM = M rounded up to a power of two, 16 at least (tl.dot's least); 1024 words a tile as
      (BN, BK) = (64, 128), or (128, 64) for 64 rows of x on wide weights (N >= 8192, not glu: two accumulators
      of 128 x 64 would not fit the registers);
    - CW = min(8, words per block): a chunk never straddles two NF4 blocks;
    - split (K splits, each at least two iterations), from the output tiles of all weights: GEMV: about 2
      programs per SM (cdiv(2 * SMs, tiles)), only where each split keeps 4 iterations (splitting short rows
      cost 25-75%); tl.dot form, BM < 64: max(4, iterations // 8) (the best or within 10% of it on every shape
      measured); BM = 64: up to 2 programs an SM (2 * SMs // tiles), at most 8 and at least 3 iterations a
      split: on the H100 (2026-11-22, .bench sweep of BN 32-128, 256-2048 words, 4/8 warps, splits 1-8) this
      rule picks the best or within 2% of it on qwen-1.5B's groups at M = 64: gate/up 1 (41.8 us), q/k/v 4
      (9.0), o 4 (9.3); down 8 (22.8 us, against 25.5 at the earlier cap of 4 splits);
    - one stage, 4 warps: more stages or warps were never faster (the loads are double-buffered by hand).
    sms: the SMs to plan for (default: the device's).
    """
    ns = [N] if isinstance(N, int) else list(N)
    cw = min(8, blocksize // 8)
    if M == 1:
        bm, bn, tile_words = 1, 8, 512
    else:
        bm = max(16, next_power_of_2(M))
        bn = 128 if bm >= 64 and max(ns) >= 8192 and not glu else 64
        tile_words = 1024
    nc = max(1, tile_words // (bn * cw))
    iters = cdiv(K // 8, nc * cw)
    tiles = (cdiv(ns[0], bn) if glu else sum(cdiv(n, bn) for n in ns)) * cdiv(M, bm)
    sms = sms or sm_count(device)
    if bm == 1:
        split = min(cdiv(2 * sms, tiles), iters // 4)
    elif bm < 64:
        split = max(4, iters // 8)
    else:
        split = min(8, 2 * sms // tiles, iters // 3)
    split = max(1, min(16, split, iters // 2))
    return {"BM": bm, "BN": bn, "NC": nc, "CW": cw, "split": split, "num_warps": 4, "num_stages": 1}


def _words(q: NF4Tensor) -> torch.Tensor | None:
    """The packed bytes as int32 words, or None where they cannot be (numel not a multiple of 4, misaligned)."""
    packed = q.packed.reshape(-1)
    if packed.numel() % 4 or packed.data_ptr() % 4:
        return None
    return packed.view(torch.int32)


def _unfusable(q: NF4Tensor) -> str | None:
    """Why the fused kernel cannot read q by rows of words (None if it can)."""
    if q.shape[1] % q.blocksize:
        return f"K={q.shape[1]} is not a multiple of the blocksize {q.blocksize}"
    if q.packed.reshape(-1).data_ptr() % 4:
        return "the packed weight is not 4-byte aligned"
    return None


def nf4_linear_fused(x2: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None,
                     config: dict | None = None) -> torch.Tensor:
    """y (M, N) = x2 (M, K) @ W^T + bias in x2's dtype by the fused kernel; `config` overrides fused_config's."""
    return nf4_grouped_fused(x2, [q], [bias], None, config)


def nf4_grouped_fused(x2: torch.Tensor, qs: Sequence[NF4Tensor], biases: Sequence[torch.Tensor | None],
                      act: str | None = None, config: dict | None = None) -> torch.Tensor:
    """The fused kernel over 1 to MAX_GROUP NF4 weights of one blocksize and quantization, in one launch.

    act None: y (M, sum N_i) = [x2 W_1^T + b_1 | ..]; act given: y (M, I) = act(x2 G^T) * (x2 U^T) for qs = (G, U)
    and no biases. Biases in x2's dtype. `config` overrides fused_config's entries.
    """
    (M, K), glu, q0 = x2.shape, act is not None, qs[0]
    ns = [q.shape[0] for q in qs]
    words = [_words(q) for q in qs]
    assert all(w is not None for w in words) and K % q0.blocksize == 0, _unfusable(q0)
    assert all(q.blocksize == q0.blocksize and q.double_quant == q0.double_quant for q in qs), "mixed quantization"
    cfg = fused_config(M, ns, K, q0.blocksize, x2.device, glu) | (config or {})
    bm, bn, nc, cw = cfg["BM"], cfg["BN"], cfg["NC"], cfg["CW"]
    step = nc * cw  # words an iteration
    iters = cdiv(K // 8, step)
    per_split = cdiv(iters, cfg["split"])
    split = cdiv(iters, per_split)  # no empty splits
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    tiles = [cdiv(ns[0], bn)] if glu else [cdiv(n, bn) for n in ns]
    grid = (sum(tiles), cdiv(M, bm), split)
    offsets = list(accumulate(tiles))[:-1]  # first tile of weights 1, 2
    offsets += [grid[0]] * (MAX_GROUP - 1 - len(offsets))  # absent weights: past the last tile, never picked
    y = torch.empty(M, ns[0] if glu else sum(ns), dtype=x2.dtype, device=x2.device)
    partial = torch.empty(split, M, sum(ns), dtype=torch.float32, device=x2.device) if split > 1 else y
    counters = split_counters(x2.device, grid[0] * grid[1]) if split > 1 else y
    pad = MAX_GROUP - len(qs)
    stats = [_stats(q) for q in qs] + [_stats(q0)] * pad
    per_weight = [*words, *[words[0]] * pad]
    for i in range(4):  # absmax, nested absmax, nested map, offset of each weight
        per_weight += [st[i] for st in stats]
    per_weight += [y if b is None else b for b in biases] + [y] * pad  # y: a stand-in never read
    _fused_kernel[grid](
        x2, nf4_levels(x2.device), y, partial, counters, *per_weight, *ns, *[0] * pad, *offsets,
        M, x2.stride(0), K // 8, per_split * step,
        BLOCKSIZE=q0.blocksize, DOUBLE_QUANT=q0.double_quant, NESTED=NESTED_BLOCKSIZE,
        BIAS=sum(1 << i for i, b in enumerate(biases) if b is not None), GLU=glu, ACT=ACTS[act] if glu else 0,
        BM=bm, BN=bn, NC=nc, CW=cw, SPLIT=split, EVEN_K=(K // 8) % step == 0,
        PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        enable_fp_fusion=bm == 1)  # the dot form keeps the reference's W bit for bit; the GEMV form sums FMAs
    return y


_noted: set[str] = set()


def _note_once(reason: str) -> None:
    """Log, once per reason, that nf4_linear takes dequantize + F.linear where the fused kernel was due."""
    if reason not in _noted:
        _noted.add(reason)
        dispatch.log.warning("gazelle kernels: nf4_linear runs dequantize + F.linear, not the fused kernel (%s); "
                             "logged once", reason)


class _NF4Linear(torch.autograd.Function):
    """y = x @ W^T + bias with W = q dequantized; gradients to x (W dequantized again) and bias, none to q."""

    @staticmethod
    def forward(ctx, x, q, bias):
        N, K = q.shape
        b = None if bias is None else bias.to(x.dtype)
        x2 = x.reshape(-1, K)  # (M, K)
        M = x2.shape[0]
        reason = _unfusable(q) if 0 < M <= FUSED_MAX_M else None
        if 0 < M <= FUSED_MAX_M and reason is None:
            y2 = nf4_linear_fused(x2, q, b)
        else:
            if reason is not None:
                _note_once(reason)
            w = _dequantize_triton(q, torch.empty(q.shape, dtype=x.dtype, device=x.device))
            y2 = F.linear(x2, w, b)
        ctx.q = q
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y2.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y (..., N)
        q = ctx.q
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = _dequantize_triton(q, torch.empty(q.shape, dtype=grad_y.dtype, device=grad_y.device))  # (N, K)
            grad_x = grad_y @ w  # (..., K)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, q.shape[0]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias


# ---------------------------------------------------------------------------------------------------- public ops


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4Tensor -> tensor of q.shape in `dtype` (default q.dtype); bit for bit gazelle.quant.nf4.dequantize_nf4."""
    dtype = dtype or q.dtype
    if dispatch.use_triton("dequantize_nf4", q.packed):
        if dtype in KERNEL_DTYPES:
            return _dequantize_triton(q, torch.empty(q.shape, dtype=dtype, device=q.device))
        dispatch.fallback("dequantize_nf4", f"no kernel for {dtype}")
    return dequantize_nf4_ref(q, dtype)


def dequantize_nf4_into(q: NF4Tensor, out: torch.Tensor) -> torch.Tensor:
    """Dequantize q into the preallocated `out` (q.shape, out's dtype) and return it.

    On the Triton path this is one kernel launch with no allocation and no host sync, so it can be captured in a
    CUDA graph with a persistent per-layer scratch buffer (nf4_levels(device) must exist before the capture).
    """
    if tuple(out.shape) != tuple(q.shape) or out.device != q.device:
        raise ValueError(f"dequantize_nf4_into: out is {tuple(out.shape)} on {out.device}, the weight "
                         f"{tuple(q.shape)} on {q.device}")
    if dispatch.use_triton("dequantize_nf4", q.packed, out):
        if out.dtype in KERNEL_DTYPES and out.is_contiguous():
            return _dequantize_triton(q, out)
        dispatch.fallback("dequantize_nf4", f"no kernel for a {'' if out.is_contiguous() else 'strided '}"
                                            f"{out.dtype} output")
    return out.copy_(dequantize_nf4_ref(q, out.dtype))


def nf4_linear_ref(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-torch reference: F.linear(x, dequantize_nf4_ref(q, x.dtype), bias) in x's dtype."""
    return F.linear(x, dequantize_nf4_ref(q, x.dtype), None if bias is None else bias.to(x.dtype))


def nf4_linear(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) @ W^T + bias in x's dtype, W = q (N, K) dequantized to x's dtype.

    Differentiable wrt x and bias (not q). Triton (module docstring) or nf4_linear_ref per gazelle.kernels.dispatch.
    """
    if len(q.shape) != 2 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"nf4_linear: x {tuple(x.shape)} does not match an NF4 weight of shape {tuple(q.shape)}")
    if bias is not None and tuple(bias.shape) != (q.shape[0],):
        raise ValueError(f"nf4_linear: bias {tuple(bias.shape)} does not match an NF4 weight of shape {tuple(q.shape)}")
    if dispatch.use_triton("nf4_linear", x, dtypes=KERNEL_DTYPES):
        return _NF4Linear.apply(x, q, bias)
    return nf4_linear_ref(x, q, bias)


def _check_group(x: torch.Tensor, qs: Sequence[NF4Tensor], biases: Sequence[torch.Tensor | None]) -> None:
    if not 1 <= len(qs) <= MAX_GROUP:
        raise ValueError(f"nf4_multi_linear takes 1 to {MAX_GROUP} weights, got {len(qs)}")
    if len(biases) != len(qs):
        raise ValueError(f"nf4_multi_linear: {len(biases)} biases for {len(qs)} weights (None for no bias)")
    for i, (q, b) in enumerate(zip(qs, biases)):
        if len(q.shape) != 2 or q.shape[1] != x.shape[-1]:
            raise ValueError(f"nf4_multi_linear: weight {i} {tuple(q.shape)} does not match x {tuple(x.shape)}: "
                             "weights are (N_i, K) for x (..., K)")
        if b is not None and tuple(b.shape) != (q.shape[0],):
            raise ValueError(f"nf4_multi_linear: bias {i} {tuple(b.shape)} does not match weight {i} "
                             f"{tuple(q.shape)}")


def _group_kernel(op: str, x2: torch.Tensor, qs: Sequence[NF4Tensor], *others: torch.Tensor | None) -> bool:
    """Whether one launch of the fused kernel serves the whole group (else each weight runs through nf4_linear)."""
    if not 0 < x2.shape[0] <= FUSED_MAX_M:
        return False  # by design: prefill-sized inputs dequantize for cuBLAS, one weight at a time
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, *others)):
        return False  # the grouped launch is inference only; nf4_linear carries the gradient
    if not dispatch.use_triton(op, x2, dtypes=KERNEL_DTYPES):
        return False
    reason = next((r for r in map(_unfusable, qs) if r), None)
    if reason is None and any(q.blocksize != qs[0].blocksize or q.double_quant != qs[0].double_quant for q in qs):
        reason = "the weights of the group differ in blocksize or double quantization"
    if reason is not None:
        dispatch.fallback(op, reason)
        return False
    return True


def nf4_multi_linear(x: torch.Tensor, qs: Sequence[NF4Tensor],
                     biases: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """[x W_1^T + b_1 | .. | x W_n^T + b_n] (..., sum N_i) in x's dtype, for 1 to MAX_GROUP NF4 weights (N_i, K).

    The decode step's q/k/v: for up to FUSED_MAX_M rows and no gradient, one launch of the fused kernel over all
    the weights (each program picks its weight; none is concatenated or dequantized); otherwise each weight
    through nf4_linear (differentiable wrt x and the biases), which the reference check uses as the oracle.
    """
    qs = list(qs)
    biases = [None] * len(qs) if biases is None else list(biases)
    _check_group(x, qs, biases)
    x2 = x.reshape(-1, x.shape[-1])
    if _group_kernel("nf4_multi_linear", x2, qs, *biases):
        y2 = nf4_grouped_fused(x2, qs, [None if b is None else b.to(x.dtype) for b in biases])
        return y2.view(*x.shape[:-1], y2.shape[1])
    return torch.cat([nf4_linear(x, q, b) for q, b in zip(qs, biases)], -1)


def nf4_glu_linear(x: torch.Tensor, gate_q: NF4Tensor, up_q: NF4Tensor, act: str) -> torch.Tensor:
    """act(x G^T) * (x U^T) (..., I) in x's dtype for NF4 weights G and U (I, K); act a name of glu.ACTS.

    The decode step's gate/up: for up to FUSED_MAX_M rows and no gradient, one launch of the fused kernel (gate
    and up in float32, never written; act(gate) * up rounded once); otherwise nf4_linear twice and glu.
    """
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTS)}")
    if gate_q.shape != up_q.shape:
        raise ValueError(f"nf4_glu_linear: gate {tuple(gate_q.shape)} and up {tuple(up_q.shape)} differ in shape")
    _check_group(x, [gate_q, up_q], [None, None])
    x2 = x.reshape(-1, x.shape[-1])
    if _group_kernel("nf4_glu_linear", x2, [gate_q, up_q]):
        y2 = nf4_grouped_fused(x2, [gate_q, up_q], [None, None], act)
        return y2.view(*x.shape[:-1], y2.shape[1])
    return glu(nf4_linear(x, gate_q), nf4_linear(x, up_q), act)
