"""Token log-probabilities and cross-entropy through the lm_head in chunks: logits are never whole.

Each chunk's logits are formed, reduced to one number per token and dropped; backward recomputes
them chunk by chunk (activation checkpointing), so peak memory holds one chunk of logits, not
B x T x vocab of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from gazelle.kernels import dispatch
from gazelle.kernels.linear_cross_entropy import linear_log_probs

IGNORE_INDEX = -100
CHUNK_BYTES = 64 * 1024 * 1024  # float32 logits held at once (a chunk's softmax temporaries are a few times this)


def _chunk_log_probs(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                     temperature: float, entropy: bool = False) -> torch.Tensor:
    logits = head(hidden)  # (n, vocab)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # 16-bit logits are upcast
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    normaliser = torch.logsumexp(logits, dim=-1)
    if not entropy:
        return picked - normaliser
    with torch.no_grad():  # H = logsumexp - sum p * logits, for logging only
        h = normaliser - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return torch.stack([picked - normaliser, h])


def token_log_probs(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(head(hidden) / temperature)[target] for every token.

    hidden (..., H) and targets (...) -> log-probs (...) in float32 (float64 for float64 input); targets equal to IGNORE_INDEX give 0.
    `head` maps (n, H) hidden states to (n, vocab) logits (lm_head and any soft-capping). A Decoder's own
    `logits` with a plain lm_head runs the fused linear cross-entropy kernel where dispatch picks Triton.
    with_entropy: also return the entropy of each position's distribution (no gradient), as a second tensor.
    """
    shape = targets.shape
    owner = getattr(head, "__self__", None)  # a Decoder's own `logits` has linear_head
    linear = None
    if hasattr(owner, "linear_head") and not with_entropy and dispatch.use_triton("linear_cross_entropy", hidden):
        linear = owner.linear_head()  # asked only here: a head in host memory hands out its slices' stream once
    if linear is not None:
        weight, cap = linear  # the fused kernel: lm_head and softmax per chunk, nothing kept but logsumexp
        return linear_log_probs(hidden, weight, targets, softcap=cap, temperature=temperature,
                                ignore_index=IGNORE_INDEX, chunk_tokens=chunk_tokens)
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, H), (N,)
    chunk = chunk_tokens or max(1, CHUNK_BYTES // (4 * vocab_size))
    grad = torch.is_grad_enabled() and hidden.requires_grad
    # The head may draw random numbers (an lm_head adapter's dropout); a CUDA-graph capture, which never runs a
    # model that does, cannot read the generator's state.
    keep_rng = not (hidden.is_cuda and torch.cuda.is_current_stream_capturing())
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if grad:
            parts.append(checkpoint(_chunk_log_probs, head, h, t, temperature, with_entropy, use_reentrant=False,
                                    preserve_rng_state=keep_rng))
        else:
            parts.append(_chunk_log_probs(head, h, t, temperature, with_entropy))
    if not parts:
        empty = hidden.new_zeros(2, 0) if with_entropy else hidden.new_zeros(0)
        parts = [empty.float() if hidden.dtype != torch.float64 else empty]
    out = torch.cat(parts, dim=-1).masked_fill(targets == IGNORE_INDEX, 0.0)
    if with_entropy:
        return out[0].reshape(shape), out[1].detach().reshape(shape)
    return out.reshape(shape)


def cross_entropy_sum(head, hidden: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                      chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over target tokens of -log p(target), number of target tokens).

    The caller divides by the token count of the whole optimizer step, so that accumulation and
    batching give the same token-normalised loss.
    """
    log_probs = token_log_probs(head, hidden, targets, vocab_size, chunk_tokens=chunk_tokens)
    return -log_probs.sum(), (targets != IGNORE_INDEX).sum()
