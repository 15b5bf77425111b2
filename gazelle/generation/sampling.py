"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p and min-p.

`sample` is the engine's path: it never waits on the device (no .item(), no multinomial, no branch on tensor
values, no value-dependent shapes), so a decode step that calls it can be captured in a CUDA graph. Python
branches on `params` are fine there: they are fixed for the batch, so they pick which graph gets captured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gazelle.errors import GazelleError


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    repetition_penalty: float = 1.0
    """Make every token already in the sequence (prompt included) less likely; 1.0 is off (CTRL, Keskar et al. 2019)."""

    def __post_init__(self):
        if self.temperature < 0:
            raise GazelleError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GazelleError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise GazelleError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise GazelleError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise GazelleError(f"repetition_penalty must be > 0 (1.0 turns it off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def mark_seen(seen: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Set seen[b, t] for every id t in row b of token_ids ((B,) or (B, T)); in place, returns seen.

    Start from `torch.zeros(B, V, dtype=torch.bool)` marked with the prompt, then mark each step's tokens.
    Padding ids get marked too; that only matters if the pad token can be generated.
    """
    # Every write stores True, so repeated ids in a row are harmless and the result is deterministic.
    return seen.scatter_(1, token_ids.reshape(seen.shape[0], -1), True)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B, V) logits with the seen tokens' logits divided by penalty if positive, multiplied if not."""
    # Dividing a negative logit would raise it, so the sign decides the direction (the CTRL / HF rule).
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(B, V) float logits with disallowed tokens set to -inf, after temperature."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the ones ranked above it already reach top_p (the first always stays).
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _penalised(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    if params.repetition_penalty == 1:
        return logits
    if seen is None:
        raise GazelleError("repetition_penalty needs the tokens seen so far: pass seen= (build it with mark_seen)")
    return apply_repetition_penalty(logits, seen, params.repetition_penalty)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, without a host sync; `seen` (B, V) bool is needed for repetition_penalty."""
    logits = _penalised(logits, params, seen)
    if params.greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits, params)
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i, from one fixed-size
    # draw and a reduction. In logs that is argmax(logit_i - log E_i): the softmax's normaliser is the same for
    # every i, so no softmax is needed and forbidden tokens stay -inf. exponential_ can return an exact 0 on some
    # backends; E is kept positive so log E stays finite.
    noise = torch.empty_like(logits).exponential_(generator=generator).clamp_min_(torch.finfo(logits.dtype).tiny)
    return first_argmax(logits - noise.log())


def first_argmax(scores: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(B, V) -> (B,) index of each row's first maximum, as scores.argmax(-1), reduced in two stages.

    A compiled argmax over a 150k vocabulary runs one GPU block per row, so a decode step of 64 rows used under
    half the SMs for ~100 us; the rows cut into chunks of `chunk` give every SM work. The first maximum of the
    first chunk that holds the row maximum is the row's first maximum, so the result equals argmax exactly."""
    B, V = scores.shape
    if V <= chunk:
        return scores.argmax(-1)
    pieces = -(-V // chunk)
    padded = torch.nn.functional.pad(scores, (0, pieces * chunk - V), value=float("-inf")).view(B, pieces, chunk)
    best, where = padded.max(-1)  # (B, pieces)
    piece = best.argmax(-1, keepdim=True)  # (B, 1)
    return (piece * chunk + where.gather(-1, piece)).squeeze(-1)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
               seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: the plain reference `sample` is tested against (multinomial syncs on CUDA)."""
    logits = _penalised(logits, params, seen)
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
