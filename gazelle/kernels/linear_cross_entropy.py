"""Token log-probs and cross-entropy through the lm_head in chunks of tokens: logits are never whole.

For N tokens and a vocabulary of V, the logits are N x V (8192 x 151936 bf16 is 2.5 GB, 5 GB in float32, more
again for softmax temporaries and their gradient). Here forward takes the tokens a chunk at a time:
logits = hidden_chunk @ weight.T by cuBLAS in the input dtype, then Triton reduces each row to its logsumexp
(online max / sum over V in blocks, float32, softcap and temperature applied on the fly; a row is split over
a few programs whose partials a second kernel combines) and picks the target's logit. Only hidden, weight,
targets and the (N,) float32 logsumexp are saved.

Backward recomputes each chunk's logits and a Triton kernel overwrites them in place with d log_prob / d z,
where z = hidden @ weight.T is the raw logit, x = cap * tanh(z / cap) (or z without softcap), y = x / T:

    log_prob = y[target] - logsumexp(y),   p = softmax(y) = exp(y - lse)
    d log_prob / d z_j = g * (onehot_j - p_j) / T * (1 - tanh(z_j / cap)^2)   (last factor with softcap only)

g being the upstream gradient of the row (0 for ignored rows). Then grad_hidden_chunk = dz @ weight and,
if the weight requires grad, grad_weight += dz.T @ hidden_chunk, accumulated over chunks in float32.
With a frozen weight (LoRA), forward does this with g = 1 while it has the logits, and backward only scales
each row by its g: one product with the whole vocabulary fewer (_LinearLogProbsFunction).

Chunk size: 2**28 bytes of logits in the input dtype (256 MiB: 883 tokens at V=151936 in bf16), rounded
down to a multiple of 64 tokens (832). That is big enough for the matmuls to run at full speed (M >= 512 at
real vocab sizes) and small beside the float32 whole (N x V x 4) that the plain path holds; backward holds one
chunk of logits besides the float32 weight-gradient accumulator (V x H x 4) when the weight trains. Bigger
chunks would mostly save the accumulator's traffic (it is read and written once per chunk).

A frozen head can also be read slice by slice (`HeadSlices`; `linear_log_probs(..., vocab_slice=)`), which is how a
head kept in host memory is streamed to the GPU (gazelle.models.host_embeddings): for each chunk of tokens the
slices of the vocabulary come one after another, and each row keeps a running max m, a running sum l of exp(y - m)
and, when hidden needs a gradient, a float32 accumulator of sum_j exp(y_j - m) f'_j W_j, all rescaled by
exp(m_old - m_new) as a slice raises the max (the online softmax of flash attention, with the head as keys and
values). At the end lse = m + log l and

    d log_prob / d hidden = (f'_t W_t - acc / l) / T,   f'_j = 1 - tanh(z_j / cap)^2 (1 without softcap)

so the whole head is never on the GPU at once: one or two slices, one slice of logits and the (tokens, H) float32
accumulator are.

Measured on an H100 (N 8192, H 1536, V 151936, bf16, forward + backward): 22 ms with a frozen weight (peak
~350 MiB above the inputs) and 34 ms with a trained one, against 121 / 169 ms for the checkpointed torch loss
(gazelle.losses.cross_entropy); the matmuls take ~75% of it.
"""

from __future__ import annotations

import torch

from gazelle.kernels import dispatch
from gazelle.kernels._triton import cdiv, jit, next_power_of_2, tl
from gazelle.kernels.glu import tanh_f32
from gazelle.kernels.launch import addmm_takes_out_dtype

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORE_INDEX = -100
CHUNK_BYTES = 2**28  # logits of one chunk, in the input dtype (64 MB cost llama-8B 2.7% of its step for 0.11 GiB)
_BLOCK_V = 4096  # vocab entries per block (8 warps x 32 lanes x 16)
_SPLIT_BLOCKS = 4  # blocks per program in forward: a row of 151936 in 10 programs of 16384 columns
SLICE_BYTES = 2**25  # head rows per slice when streamed: 32 MB (4096 rows of llama-8B's head, 10880 of qwen-1.5B's)


def _rows_within(budget: int, row_elements: int, dtype: torch.dtype, multiple: int) -> int:
    """Rows of row_elements `dtype` values within `budget` bytes, a multiple of `multiple` when that many fit,
    at least 1."""
    rows = max(1, budget // (max(1, row_elements) * torch.empty((), dtype=dtype).element_size()))
    return rows - rows % multiple if rows >= multiple else rows


def default_chunk_tokens(vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: CHUNK_BYTES of logits in `dtype`, a multiple of 64 when that many fit, at least 1."""
    return _rows_within(CHUNK_BYTES, vocab_size, dtype, 64)


def default_slice_rows(hidden_size: int, dtype: torch.dtype) -> int:
    """Head rows per streamed slice: SLICE_BYTES of the head in `dtype`, a multiple of 128 when that many fit."""
    return _rows_within(SLICE_BYTES, hidden_size, dtype, 128)


class HeadSlices:
    """A frozen (V, H) head read as consecutive slices of `rows` rows: `get(k)` gives the k-th slice read (slice k
    modulo the slice count: a second chunk of tokens reads them all again) on the compute device, `done(k)` says
    that the work reading it has been issued. This one serves a weight that is on that device already (views);
    gazelle.models.host_embeddings.HeadStream copies slices of a host head through a ring of buffers."""

    def __init__(self, weight: torch.Tensor, rows: int):
        if weight.requires_grad:
            raise ValueError("a head read in slices must be frozen (requires_grad=False)")
        self.weight, self.rows = weight, max(1, int(rows))
        self.shape, self.dtype = weight.shape, weight.dtype

    @property
    def count(self) -> int:
        return cdiv(self.shape[0], self.rows)

    def plan(self, reads: int) -> None:
        """The slices will be read `reads` times in all (count x chunks of tokens)."""

    def get(self, k: int) -> torch.Tensor:
        start = (k % self.count) * self.rows
        return self.weight[start : start + self.rows]

    def done(self, k: int) -> None:
        """Work reading slice read k is issued (a ring may refill its buffer)."""

    def drain(self) -> None:
        """No slice will be read (no tokens): a ring joins the copies it has in flight."""

    def whole(self, device: torch.device) -> torch.Tensor:
        """The whole head on `device`, for the reference path."""
        return self.weight.to(device)


# ----------------------------------------------------------------------------------------------- references


def linear_log_probs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None, temperature: float = 1.0,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log softmax(softcap(hidden @ weight.T) / temperature)[target], 0 where target == ignore_index.

    hidden (N, H), weight (V, H), targets (N,) -> (N,) float32 (float64 for float64 input). Plain torch with the
    whole logits: the oracle for small shapes (linear_log_probs' CPU fallback runs it chunk by chunk).
    """
    logits = hidden @ weight.t()  # (N, V) in the input dtype, as the decoder's lm_head
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.long().clamp(min=0)[:, None]).squeeze(-1)  # (N,)
    return (picked - torch.logsumexp(logits, dim=-1)).masked_fill(targets == ignore_index, 0.0)


def _chunked_ref(hidden, weight, targets, softcap, temperature, ignore_index, chunk):
    """The reference over chunks of tokens, checkpointed when it needs grad, so the fallback also stays small."""
    from torch.utils.checkpoint import checkpoint

    if hidden.shape[0] <= chunk:
        return linear_log_probs_ref(hidden, weight, targets, softcap, temperature, ignore_index)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for s in range(0, hidden.shape[0], chunk):
        args = (hidden[s : s + chunk], weight, targets[s : s + chunk], softcap, temperature, ignore_index)
        parts.append(checkpoint(linear_log_probs_ref, *args, use_reentrant=False, preserve_rng_state=False) if grad
                     else linear_log_probs_ref(*args))
    return torch.cat(parts)


# -------------------------------------------------------------------------------------------------- kernels


@jit
def _lse_partial_kernel(z_ptr, m_ptr, s_ptr, V, stride_row, n_splits, split_cols, cap, inv_cap, inv_temp,
                        HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Partial logsumexp of one row of z (n, V) over the columns [split * split_cols, + split_cols): its max m
    and sum of exp(y - m), to m, s (n, n_splits). Splitting a row over programs keeps the GPU busy (a chunk has
    only some hundred rows) and the loops short.

    Each lane keeps its own running max m and sum s over the columns it visits (no cross-warp reduction inside
    the loop), with one exp per element: for d = y - m, s <- s * exp(-d) + 1 if d > 0 (new max), else
    s + exp(d). Lanes are combined once at the end. m starts at -1e30, not -inf, so a lane that only ever sees
    masked columns (y = -inf) keeps s = 0 and no inf - inf arises.
    """
    pid = tl.program_id(0)
    row = pid // n_splits
    split = pid % n_splits
    base = z_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], -1e30, dtype=tl.float32)  # per-lane running max
    s = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane sum of exp(y - m)
    lo = split * split_cols
    hi = tl.minimum(lo + split_cols, V)
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        mask = cols < hi
        y = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            y = cap * tanh_f32(y * inv_cap)
        y = tl.where(mask, y * inv_temp, float("-inf"))
        d = y - m
        e = tl.exp(-tl.abs(d))
        s = tl.where(d > 0.0, s * e + 1.0, s + e)
        m = tl.maximum(m, y)
    m_split = tl.max(m, axis=0)
    tl.store(m_ptr + pid, m_split)
    tl.store(s_ptr + pid, tl.sum(s * tl.exp(m - m_split), axis=0))


@jit
def _lse_combine_kernel(z_ptr, targets_ptr, m_ptr, s_ptr, lse_ptr, logp_ptr, V, stride_row, n_splits, cap,
                        inv_cap, inv_temp, ignore_index, HAS_SOFTCAP: tl.constexpr, SPLITS: tl.constexpr):
    """One program per row: lse = logsumexp of the row's partials, log_prob = y[target] - lse (0 if ignored)."""
    row = tl.program_id(0)
    k = tl.arange(0, SPLITS)
    mask = k < n_splits
    m = tl.load(m_ptr + row * n_splits + k, mask=mask, other=-1e30)
    s = tl.load(s_ptr + row * n_splits + k, mask=mask, other=0.0)
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    safe = tl.where(valid & (target >= 0) & (target < V), target, 0)  # targets must lie in [0, V) or be ignored
    y_t = tl.load(z_ptr + row.to(tl.int64) * stride_row + safe).to(tl.float32)
    if HAS_SOFTCAP:
        y_t = cap * tanh_f32(y_t * inv_cap)
    y_t = y_t * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(valid, y_t - lse, 0.0))


@jit
def _lse_bwd_kernel(z_ptr, targets_ptr, lse_ptr, grad_ptr, V, stride_row, n_vblocks, cap, inv_cap, inv_temp,
                    ignore_index, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """z (n, V) <- d log_prob / d z * grad[row], in place; one program per BLOCK_V columns of one row."""
    pid = tl.program_id(0)
    row = pid // n_vblocks
    cols = (pid % n_vblocks) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    ptrs = z_ptr + row.to(tl.int64) * stride_row + cols
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.where(target == ignore_index, 0.0, tl.load(grad_ptr + row)) * inv_temp
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        t = tanh_f32(z * inv_cap)
        y = cap * t * inv_temp
    else:
        y = z * inv_temp
    d = (tl.where(cols == target, 1.0, 0.0) - tl.exp(y - lse)) * g
    if HAS_SOFTCAP:
        d = d * (1.0 - t * t)
    tl.store(ptrs, d.to(z_ptr.dtype.element_ty), mask=mask)


@jit
def _slice_softmax_kernel(z_ptr, w_ptr, targets_ptr, m_ptr, l_ptr, alpha_ptr, picked_ptr, tgt_ptr, Vs, H, offset,
                          stride_z, stride_w, stride_t, cap, inv_cap, inv_temp, ignore_index,
                          HAS_SOFTCAP: tl.constexpr, EARLY: tl.constexpr, BLOCK_V: tl.constexpr,
                          BLOCK_H: tl.constexpr):
    """One row of a head slice's logits z (n, Vs), vocabulary offset `offset`, folded into the row's running state.

    m, l: the running max of y and sum of exp(y - m); alpha <- exp(m_old - m_new), by which the caller rescales its
    accumulator. EARLY: z is overwritten in place with exp(y - m_new) * f' (the weights of the accumulator's next
    product with the slice). If the row's target lies in the slice: picked <- y_target and, EARLY, the row of
    tgt (n, H) <- f'_target * W[target] (each row's target lies in exactly one slice; ignored rows never write).
    """
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    offs = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    local = target - offset
    if (target != ignore_index) & (local >= 0) & (local < Vs):  # before z is overwritten
        z_t = tl.load(base + local).to(tl.float32)
        if HAS_SOFTCAP:
            t_t = tanh_f32(z_t * inv_cap)
            tl.store(picked_ptr + row, cap * t_t * inv_temp)
            f_t = 1.0 - t_t * t_t
        else:
            tl.store(picked_ptr + row, z_t * inv_temp)
            f_t = 1.0
        if EARLY:
            w_row = w_ptr + local.to(tl.int64) * stride_w
            t_row = tgt_ptr + row.to(tl.int64) * stride_t
            for h0 in range(0, H, BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)
                w = tl.load(w_row + cols, mask=cols < H, other=0.0).to(tl.float32)
                tl.store(t_row + cols, (w * f_t).to(tgt_ptr.dtype.element_ty), mask=cols < H)
    top = tl.full([BLOCK_V], -1e30, dtype=tl.float32)
    for start in range(0, Vs, BLOCK_V):
        cols = start + offs
        y = tl.load(base + cols, mask=cols < Vs, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            y = cap * tanh_f32(y * inv_cap)
        top = tl.maximum(top, tl.where(cols < Vs, y * inv_temp, -1e30))
    m_old = tl.load(m_ptr + row)
    m_new = tl.maximum(m_old, tl.max(top, axis=0))
    total = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, Vs, BLOCK_V):
        cols = start + offs
        mask = cols < Vs
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = tanh_f32(z * inv_cap)
            y = cap * t * inv_temp
        else:
            y = z * inv_temp
        e = tl.where(mask, tl.exp(y - m_new), 0.0)
        total += e
        if EARLY:
            if HAS_SOFTCAP:
                e = e * (1.0 - t * t)
            tl.store(base + cols, e.to(z_ptr.dtype.element_ty), mask=mask)
    alpha = tl.exp(m_old - m_new)
    tl.store(alpha_ptr + row, alpha)
    tl.store(m_ptr + row, m_new)
    tl.store(l_ptr + row, tl.load(l_ptr + row) * alpha + tl.sum(total, axis=0))


# ---------------------------------------------------------------------------------------------------- autograd


def _block_v(V: int) -> int:
    return min(_BLOCK_V, max(16, next_power_of_2(V)))


def _kernel_args(softcap: float | None, temperature: float) -> dict:
    cap = float(softcap) if softcap is not None else 1.0
    return dict(cap=cap, inv_cap=1.0 / cap, inv_temp=1.0 / float(temperature), HAS_SOFTCAP=softcap is not None)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b; 16-bit a, b go straight into acc where torch's addmm takes out_dtype (CUDA), else
    through a 16-bit product."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and addmm_takes_out_dtype():
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


class _LinearLogProbsFunction(torch.autograd.Function):
    """log_probs (N,) float32 of hidden (N, H) through weight (V, H); see the module docstring.

    When hidden needs a gradient and the weight does not (LoRA and QLoRA: the lm_head is frozen), forward also
    forms d log_prob_t / d hidden_t for every token while each chunk's logits are still there, and keeps that
    (N, H) in place of hidden: log_prob_t depends on hidden_t alone, so backward only scales row t by the
    incoming gradient of token t, exactly, for any upstream loss. That spares backward a second product of every
    chunk with the whole vocabulary. A trained weight needs the incoming gradients inside its sum over tokens,
    so it keeps the recomputing backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, temperature, ignore_index, chunk, early):
        n_tokens, V = hidden.shape[0], weight.shape[0]
        lse = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        log_probs = torch.empty_like(lse)
        grad_rows = torch.empty_like(hidden) if early else None  # d log_prob_t / d hidden_t, (N, H)
        ones = torch.ones(min(chunk, n_tokens), dtype=torch.float32, device=hidden.device) if early else None
        if n_tokens:
            block = _block_v(V)
            split_cols = block * _SPLIT_BLOCKS
            n_splits = cdiv(V, split_cols)
            rows = min(chunk, n_tokens)
            buf = torch.empty(rows, V, dtype=hidden.dtype, device=hidden.device)
            m_part = torch.empty(rows, n_splits, dtype=torch.float32, device=hidden.device)
            s_part = torch.empty_like(m_part)
            args = _kernel_args(softcap, temperature)
            for s in range(0, n_tokens, chunk):
                e = min(s + chunk, n_tokens)
                z = buf[: e - s]  # (n, V), contiguous
                torch.mm(hidden[s:e], weight.t(), out=z)
                _lse_partial_kernel[((e - s) * n_splits,)](z, m_part, s_part, V, z.stride(0), n_splits, split_cols,
                                                           BLOCK_V=block, num_warps=8, **args)
                _lse_combine_kernel[(e - s,)](z, targets[s:e], m_part, s_part, lse[s:e], log_probs[s:e], V,
                                              z.stride(0), n_splits, ignore_index=ignore_index,
                                              SPLITS=max(2, next_power_of_2(n_splits)), num_warps=1, **args)
                if early:
                    _logit_grads(z, targets[s:e], lse[s:e], ones[: e - s], ignore_index, block, args)
                    torch.mm(z, weight, out=grad_rows[s:e])
        if early:
            ctx.save_for_backward(grad_rows)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.early = early
        ctx.args = (softcap, temperature, ignore_index, chunk)
        return log_probs

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.early:  # grad_hidden_t = grad_out_t * d log_prob_t / d hidden_t, formed in forward
            (grad_rows,) = ctx.saved_tensors
            scale = grad_out.to(torch.promote_types(grad_rows.dtype, torch.float32))[:, None]
            return (grad_rows * scale).to(grad_rows.dtype), None, None, None, None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        softcap, temperature, ignore_index, chunk = ctx.args
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_hidden or want_weight):
            return (None,) * 8
        n_tokens, V = hidden.shape[0], weight.shape[0]
        grad_out = grad_out.to(torch.float32).contiguous()  # (N,), e.g. expanded from a sum
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want_hidden else None
        grad_weight = None
        if want_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if n_tokens:
            block = _block_v(V)
            buf = torch.empty(min(chunk, n_tokens), V, dtype=hidden.dtype, device=hidden.device)
            args = _kernel_args(softcap, temperature)
            for s in range(0, n_tokens, chunk):
                e = min(s + chunk, n_tokens)
                h = hidden[s:e]  # (n, H)
                dz = buf[: e - s]  # (n, V): logits, then their gradient in place
                torch.mm(h, weight.t(), out=dz)
                _logit_grads(dz, targets[s:e], lse[s:e], grad_out[s:e], ignore_index, block, args)
                if want_hidden:
                    torch.mm(dz, weight, out=grad_hidden[s:e])
                if want_weight:
                    _accumulate_mm(grad_weight, dz.t(), h)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


class _StreamedLogProbsFunction(torch.autograd.Function):
    """log_probs (N,) float32 of hidden (N, H) through a frozen head read in slices (HeadSlices); see the module
    docstring. For each chunk of tokens every slice is read once: its logits by cuBLAS, the row state folded by
    _slice_softmax_kernel and, when hidden needs a gradient, acc = acc * alpha + exp-weights @ slice (float32).
    Backward scales the (N, H) d log_prob_t / d hidden_t formed in forward by each token's incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, source, targets, softcap, temperature, ignore_index, chunk, early):
        n_tokens, H = hidden.shape
        dev = hidden.device
        log_probs = torch.empty(n_tokens, dtype=torch.float32, device=dev)
        grad_rows = torch.empty_like(hidden) if early else None  # d log_prob_t / d hidden_t, (N, H)
        if not n_tokens:
            source.drain()
        else:
            rows, count = source.rows, source.count
            source.plan(count * cdiv(n_tokens, chunk))
            n = min(chunk, n_tokens)
            z_buf = torch.empty(n * rows, dtype=hidden.dtype, device=dev)  # one slice's logits, (n, rows)
            m, l, alpha, picked = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(4))
            acc = torch.empty(n, H, dtype=torch.float32, device=dev) if early else None
            args = _kernel_args(softcap, temperature)
            block_v = min(_BLOCK_V, max(16, next_power_of_2(rows)))
            block_h = min(1024, max(16, next_power_of_2(H)))
            read = 0
            for s in range(0, n_tokens, chunk):
                e = min(s + chunk, n_tokens)
                h, t = hidden[s:e], targets[s:e]
                m[: e - s].fill_(-1e30)
                l.zero_()
                picked.zero_()
                tgt = grad_rows[s:e].zero_() if early else picked  # f'_t W_t per row (tgt unused without grad)
                if early:
                    acc.zero_()
                for i in range(count):
                    w = source.get(read)  # (vs, H) on the device
                    z = z_buf[: (e - s) * w.shape[0]].view(e - s, w.shape[0])
                    torch.mm(h, w.t(), out=z)
                    _slice_softmax_kernel[(e - s,)](z, w, t, m, l, alpha, picked, tgt, w.shape[0], H, i * rows,
                                                    z.stride(0), w.stride(0), tgt.stride(0) if early else 0,
                                                    ignore_index=ignore_index, EARLY=early, BLOCK_V=block_v,
                                                    BLOCK_H=block_h, num_warps=8, **args)
                    if early:
                        a = acc[: e - s]
                        a.mul_(alpha[: e - s, None])
                        _accumulate_mm(a, z, w)
                    source.done(read)
                    read += 1
                valid = t != ignore_index
                lse = m[: e - s] + torch.log(l[: e - s])
                log_probs[s:e] = torch.where(valid, picked[: e - s] - lse, 0.0)
                if early:  # (f'_t W_t - acc / l) / T, 0 for ignored rows
                    a = acc[: e - s]
                    a.div_(l[: e - s, None]).neg_().add_(tgt)
                    a.mul_((valid.to(torch.float32) * args["inv_temp"])[:, None])
                    tgt.copy_(a)
        ctx.save_for_backward(grad_rows)
        return log_probs

    @staticmethod
    def backward(ctx, grad_out):
        (grad_rows,) = ctx.saved_tensors
        scale = grad_out.to(torch.promote_types(grad_rows.dtype, torch.float32))[:, None]
        return (grad_rows * scale).to(grad_rows.dtype), None, None, None, None, None, None, None


def _logit_grads(z, targets, lse, grad, ignore_index: int, block: int, args: dict) -> None:
    """z (n, V): the logits of n tokens, overwritten with d log_prob / d z times grad (n,) float32."""
    n_vblocks = cdiv(z.shape[1], block)
    _lse_bwd_kernel[(z.shape[0] * n_vblocks,)](z, targets, lse, grad, z.shape[1], z.stride(0), n_vblocks,
                                               ignore_index=ignore_index, BLOCK_V=block, num_warps=8, **args)


# -------------------------------------------------------------------------------------------------- public ops


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor | HeadSlices, targets: torch.Tensor,
                     softcap: float | None = None, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                     chunk_tokens: int | None = None, vocab_slice: int | None = None) -> torch.Tensor:
    """log softmax(softcap(hidden @ weight.T) / temperature)[target] per token, logits formed chunk by chunk.

    hidden (..., H), weight (V, H) (the lm_head weight, trainable or frozen), targets (...) int with values in
    [0, V) or ignore_index -> log-probs (...) in float32 (float64 for float64 input), 0 where ignored.
    Differentiable wrt hidden and weight. chunk_tokens: tokens per chunk (default: default_chunk_tokens).
    weight may also be a HeadSlices (a frozen head read slice by slice, e.g. streamed from host memory), and
    vocab_slice reads a frozen weight tensor that way, in slices of that many rows.
    """
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, H), (N,)
    source = weight if isinstance(weight, HeadSlices) else None
    if source is None and vocab_slice is not None:
        source = HeadSlices(weight, vocab_slice)
    if source is not None:
        return _streamed(hidden, source, targets, softcap, temperature, ignore_index, chunk_tokens).reshape(shape)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.dtype)
    if dispatch.use_triton("linear_cross_entropy", hidden, weight, targets, dtypes=KERNEL_DTYPES):
        if weight.dtype != hidden.dtype:
            raise ValueError(f"hidden is {hidden.dtype} but the weight is {weight.dtype}; cast one of them")
        # The hidden gradient in forward (see _LinearLogProbsFunction) where autograd will want it and only it.
        early = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
        out = _LinearLogProbsFunction.apply(hidden, weight, targets.long().contiguous(), softcap,
                                            float(temperature), int(ignore_index), int(chunk), early)
    else:
        out = _chunked_ref(hidden, weight, targets, softcap, temperature, ignore_index, chunk)
    return out.reshape(shape)


def _streamed(hidden, source: HeadSlices, targets, softcap, temperature, ignore_index, chunk_tokens):
    """linear_log_probs over a head read in slices: hidden (N, H), targets (N,) -> (N,)."""
    if source.dtype != hidden.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but the head is {source.dtype}; cast one of them")
    if not dispatch.use_triton("linear_cross_entropy", hidden, targets, dtypes=KERNEL_DTYPES):
        weight = source.whole(hidden.device)
        chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.dtype)
        return _chunked_ref(hidden, weight, targets, softcap, temperature, ignore_index, chunk)
    # Tokens per chunk: all of them while one slice of logits stays within CHUNK_BYTES (each chunk reads the
    # whole head again).
    chunk = chunk_tokens or max(1, CHUNK_BYTES // (source.rows * hidden.element_size()))
    early = torch.is_grad_enabled() and hidden.requires_grad
    return _StreamedLogProbsFunction.apply(hidden, source, targets.long().contiguous(), softcap, float(temperature),
                                           int(ignore_index), int(chunk), early)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None, ignore_index: int = IGNORE_INDEX, reduction: str = "sum",
                         chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, number of target tokens) of softcap(hidden @ weight.T) against targets, logits never whole.

    reduction "sum": the sum over non-ignored tokens of -log p(target) (as losses.cross_entropy_sum: the caller
    divides by the step's token count); "mean": that sum over the count (0 when no token counts).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
    log_probs = linear_log_probs(hidden, weight, targets, softcap, 1.0, ignore_index, chunk_tokens)
    n_tokens = (targets != ignore_index).sum()
    loss = -log_probs.sum()
    if reduction == "mean":
        loss = loss / n_tokens.clamp(min=1)
    return loss, n_tokens
