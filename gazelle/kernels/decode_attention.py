"""Decode attention: one query per sequence over a static KV cache, reading only the keys each row can see.

For row b, query head h (kv head h // G, G = H // KV) and key slot s of the cache view k, v (B, KV, S, D):
    visible(b, s) = s <= positions[b] and (window is None or s > positions[b] - window)
    score(s)      = c * tanh((q . k_s) * scale / c)    with softcap c, else (q . k_s) * scale
    out           = sum over visible s of softmax(score)_s * v_s         (float32 softmax and sums)
Slots outside the visible range may hold anything (NaN, inf, an earlier sequence): neither the kernel nor the
reference lets them reach the result. The row's own slot is always visible, so no softmax is empty.

The Triton path is flash-decoding, grid (B, KV, SPLITS): a program takes the G query heads of one kv head (padded
to a power of two >= 16 rows for tl.dot, the padding masked), reads positions[b] from memory and walks only its
share of the visible key blocks [max(0, pos - window + 1), pos] (a loop bound loaded at run time), BLOCK_S keys
at a time, with an online softmax (running max and sum in the exp2 domain, float32 accumulator; probabilities
rounded to v's dtype for the second product, as the decoder's softmax(...).to(q.dtype) @ v does). SPLITS == 1
writes the output; otherwise each split writes (max, sum, acc) to float32 scratch and a small kernel, grid
(B, H), combines them. SPLITS comes from shapes only (B * KV * SPLITS up to PROGRAMS_PER_SM programs per SM, at
most one split per key block of S), so a launch never syncs with the host nor depends on positions' values: the
op can be captured in a CUDA graph and replayed with new positions written in place.

`decode_attention` is a torch custom op (gazelle::decode_attention) so a torch.compile'd decode step keeps it
as one opaque call instead of tracing the Triton launch. Inference only: it has no gradient.
"""

from __future__ import annotations

import torch

from gazelle.kernels import dispatch
from gazelle.kernels._triton import cdiv, jit, next_power_of_2, tl
from gazelle.kernels.glu import tanh_f32
from gazelle.kernels.launch import sm_count

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # q, the accumulator and a key block are held in registers; wider heads run the reference
PROGRAMS_PER_SM = 2  # the split rule's target: B * KV * SPLITS <= this many programs per SM
MIN_BLOCKS_PER_SPLIT = 4  # and each split at least this many key blocks of the cache's slots
INTERPRETER_PROGRAMS = 8  # the same target for CPU tensors (Triton's interpreter), where there are no SMs
# benchmarks/decode_attention.py (H100, 2026-11-22, a cache of 384 slots): 4 warps; 3 stages beat 2 at both
# shapes (llama-8B 32 rows 17.0 -> 16.4 us, qwen-1.5B 64 rows 11.4 -> 10.2 us with one split); 32-128 keys a
# block within 4% of each other.
NUM_WARPS = 4
NUM_STAGES = 3


def _block_s(head_dim: int) -> int:
    """Keys per iteration: a tile of k (and one of v) is 16 KB of 16-bit values for head dims 128 and 256."""
    return 64 if head_dim <= 128 else 32


# -------------------------------------------------------------------------------------------------- reference


def decode_attention_ref(q, k, v, positions, scale, softcap=None, window=None) -> torch.Tensor:
    """The plain-torch oracle of the module docstring, in float32; k and v read once per group of query heads.

    q (B, H, 1, D), k and v (B, KV, S, D), positions (B,) -> (B, H, 1, D) in q's dtype.
    """
    B, H, _, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    slots = torch.arange(S, device=q.device)
    pos = positions.to(q.device)[:, None]  # (B, 1)
    visible = slots[None, :] <= pos  # (B, S)
    if window is not None:
        visible = visible & (slots[None, :] > pos - window)
    qg = q.float().reshape(B, kv_heads, H // kv_heads, D)  # query heads of one kv head are consecutive
    scores = qg @ k.float().transpose(-1, -2) * scale  # (B, KV, G, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    v_seen = v.float().masked_fill(~visible[:, None, :, None], 0.0)  # 0 * NaN would still be NaN
    return (probs @ v_seen).reshape(B, H, 1, D).to(q.dtype)  # (B, KV, G, D) -> (B, H, 1, D)


# -------------------------------------------------------------------------------------------------- kernels


@jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                   S, D, G, window, scale, cap,
                   stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_od, stride_pb,
                   SPLITS: tl.constexpr, GP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr):
    """Program (b, kv head, split): the G query heads of the kv head over the split's share of the visible keys.

    UPCAST (Triton's interpreter with bf16, whose tl.dot multiplies bf16 operands as their raw uint16 bits): the
    operands go to float32 first, which gives the same products as the GPU's bf16 dot with float32 accumulation.
    """
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    pos = tl.load(pos_ptr + b * stride_pb).to(tl.int32)
    last = tl.minimum(pos, S - 1)  # the last visible slot (positions are slots of the cache view)
    if HAS_WINDOW:
        first = tl.maximum(pos - window + 1, 0)
    else:
        first = pos * 0
    first_block = first // BLOCK_S
    n_blocks = last // BLOCK_S - first_block + 1  # >= 1: every one of them holds a visible key
    if SPLITS == 1:
        block_begin = first_block
        block_end = first_block + n_blocks
    else:  # the visible blocks dealt evenly; the last splits may get none
        per_split = tl.cdiv(n_blocks, SPLITS)
        block_begin = first_block + split * per_split
        block_end = tl.minimum(block_begin + per_split, first_block + n_blocks)

    g = tl.arange(0, GP)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    heads = kvh * G + g  # (GP,) query heads of this kv head
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (GP, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh + d[None, :] * stride_kd
    v_base = v_ptr + b * stride_vb + kvh * stride_vh + d[None, :] * stride_vd

    m = tl.full((GP,), float("-inf"), tl.float32)  # running max of scores * log2(e)
    row_sum = tl.zeros((GP,), tl.float32)  # running sum of exp2(score * log2(e) - m)
    acc = tl.zeros((GP, BLOCK_D), tl.float32)
    for block in range(block_begin, block_end):
        s = block * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,) key slots
        s_ok = (s >= first) & (s <= last)
        kv_mask = s_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_base + s.to(tl.int64)[:, None] * stride_ks, mask=kv_mask, other=0.0)  # (BLOCK_S, BLOCK_D)
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, tl.trans(kt), input_precision=PRECISION)  # (GP, BLOCK_S) float32
        if SOFTCAP:  # t: the score times log2(e), for exp2
            t = (cap * 1.4426950408889634) * tanh_f32(qk * (scale / cap))
        else:
            t = qk * (scale * 1.4426950408889634)
        t = tl.where(s_ok[None, :], t, float("-inf"))
        m_new = tl.maximum(m, tl.max(t, axis=1))  # finite: the block has a visible key
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(t - m_new[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + s.to(tl.int64)[:, None] * stride_vs, mask=kv_mask, other=0.0)  # (BLOCK_S, BLOCK_D)
        p = p.to(v_ptr.dtype.element_ty)  # the decoder's rounding of the probabilities to v's dtype
        if UPCAST:
            p, vt = p.to(tl.float32), vt.to(tl.float32)
        acc = tl.dot(p, vt, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new

    out_mask = g_ok[:, None] & d_ok[None, :]
    if SPLITS == 1:
        out = acc / row_sum[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:  # scratch (B, H, SPLITS) for m and l, (B, H, SPLITS, D) for acc, all contiguous float32
        row = (b * G * tl.num_programs(1) + heads) * SPLITS + split  # (GP,)
        tl.store(part_m_ptr + row, m, mask=g_ok)
        tl.store(part_l_ptr + row, row_sum, mask=g_ok)
        tl.store(part_acc_ptr + row[:, None] * D + d[None, :], acc, mask=out_mask)


@jit
def _combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, H, D, stride_ob, stride_oh, stride_od,
                    SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, h): out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i, M = max_i m_i (finite: split 0 ran)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    i = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    i_ok = i < SPLITS
    d_ok = d < D
    row = (b * H + h) * SPLITS + i  # (BLOCK_SPLITS,)
    m = tl.load(part_m_ptr + row, mask=i_ok, other=float("-inf"))
    row_sum = tl.load(part_l_ptr + row, mask=i_ok, other=0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * D + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # 0 for empty splits (m = -inf)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(row_sum * w, axis=0)  # (BLOCK_D,)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=d_ok)


# -------------------------------------------------------------------------------------------------- launcher


def num_splits(batch: int, kv_heads: int, slots: int, block_s: int, device: torch.device) -> int:
    """Key splits per (row, kv head), from shapes only: the grid fills up to PROGRAMS_PER_SM programs per SM, and
    a split gets MIN_BLOCKS_PER_SPLIT key blocks of the cache at least. A split's fixed costs (the partial sums,
    the combine launch) pay only over several blocks: at 6 blocks (384 slots), 128 programs unsplit took 10.2 us
    and 256 programs of two splits 11.8 us (qwen-1.5B, 64 rows, H100)."""
    target = PROGRAMS_PER_SM * sm_count(device) if device.type == "cuda" else INTERPRETER_PROGRAMS
    return max(1, min(target // (batch * kv_heads), cdiv(slots, block_s) // MIN_BLOCKS_PER_SPLIT))


def _decode_attention_triton(q, k, v, positions, scale: float, softcap: float | None, window: int | None,
                             splits: int | None = None, block_s: int | None = None, num_warps: int = NUM_WARPS,
                             num_stages: int = NUM_STAGES) -> torch.Tensor:
    """The kernels of the module docstring; splits, block_s, num_warps and num_stages override the shape rules
    (tests, benchmarks/decode_attention.py's sweep)."""
    B, H, _, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    G = H // kv_heads
    block_s = block_s or _block_s(D)
    splits = splits or num_splits(B, kv_heads, S, block_s, q.device)
    block_d = max(16, next_power_of_2(D))
    upcast = q.dtype == torch.bfloat16 and dispatch.interpreting()
    out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    if splits > 1:
        part_m = torch.empty((B, H, splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((B, H, splits, D), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused
    _decode_kernel[(B, kv_heads, splits)](
        q, k, v, positions, out, part_m, part_l, part_acc,
        S, D, G, window or 0, float(scale), float(softcap or 1.0),
        q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3), out.stride(0), out.stride(1), out.stride(3),
        positions.stride(0),
        SPLITS=splits, GP=max(16, next_power_of_2(G)), BLOCK_S=block_s, BLOCK_D=block_d,
        HAS_WINDOW=window is not None, SOFTCAP=softcap is not None,
        PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _combine_kernel[(B, H)](
            part_m, part_l, part_acc, out, H, D, out.stride(0), out.stride(1), out.stride(3),
            SPLITS=splits, BLOCK_SPLITS=next_power_of_2(splits), BLOCK_D=block_d, num_warps=NUM_WARPS)
    return out


# -------------------------------------------------------------------------------------------------- the op


def _check(q, k, v, positions, window) -> None:
    """Shapes of the module docstring, checked both eagerly and while torch.compile traces the op."""
    if q.dim() != 4 or q.shape[2] != 1 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} must be (B, H, 1, D), k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)} the same (B, KV, S, D)")
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(f"decode_attention: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} "
                         "(same B and D, H a multiple of KV)")
    if tuple(positions.shape) != (B,) or positions.is_floating_point():
        raise ValueError(f"decode_attention: positions must be (B,) integers, got {tuple(positions.shape)} "
                         f"{positions.dtype}")
    if window is not None and window < 1:
        raise ValueError(f"decode_attention: window {window} must be >= 1")


@torch.library.custom_op("gazelle::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, scale: float,
                     softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """Attention of one query per row over the cache view (module docstring): q (B, H, 1, D), k and v
    (B, KV, S, D) with H a multiple of KV, positions (B,) int64 slots in [0, S) -> (B, H, 1, D) in q's dtype.
    q may be any strided view (the decoder passes (B, 1, H, D) transposed); k and v rows of a larger cache.

    Triton (module docstring) or decode_attention_ref per gazelle.kernels.dispatch. Inference only: there is no
    autograd formula, so a backward through the result raises.
    """
    _check(q, k, v, positions, window)
    if dispatch.use_triton("decode_attention", q, k, v, dtypes=KERNEL_DTYPES):
        if q.shape[-1] > MAX_HEAD_DIM:
            dispatch.fallback("decode_attention", f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
        elif k.dtype != q.dtype or v.dtype != q.dtype:
            dispatch.fallback("decode_attention", f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}")
        elif positions.device != q.device:
            dispatch.fallback("decode_attention", f"positions on {positions.device}, q on {q.device}")
        else:
            return _decode_attention_triton(q, k, v, positions, scale, softcap, window)
    return decode_attention_ref(q, k, v, positions, scale, softcap, window)


@decode_attention.register_fake
def _(q, k, v, positions, scale, softcap=None, window=None):
    _check(q, k, v, positions, window)
    return q.new_empty(q.shape)
