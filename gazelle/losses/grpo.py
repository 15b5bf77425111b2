"""GRPO and its variants as pure functions: advantages from rewards, and the clipped policy loss.

Notation, for completion i of a batch with tokens t = 1..|o_i| (mask m_it = 1 on completion tokens):

    r_it   = exp(logp_it - old_logp_it)                       token-level importance ratio
    s_i    = exp(sum_t m_it (logp_it - old_logp_it) / |o_i|)  sequence-level ratio (GSPO), used for every t
    l_it   = -min(w_it A_i, clip(w_it, 1 - eps_low, 1 + eps_high) A_i)  + beta * kl_it
    kl_it  = exp(ref_it - logp_it) - (ref_it - logp_it) - 1   (the k3 estimator, >= 0)

with w = r (importance_sampling_level="token") or w = s ("sequence"). When the completions were sampled by
the same weights (one iteration), old_logp is logp detached: w = 1, and the gradient is A_i grad logp_it.

Aggregation over a batch of B completions, with L = max_completion_length:

    grpo     (1/B) sum_i (1/|o_i|) sum_t m_it l_it         each completion weighs the same
    bnpo     sum_it m_it l_it / sum_it m_it                over the micro-batch's tokens
    dr_grpo  sum_it m_it l_it / (B L)                      a constant: no length bias
    dapo     sum_it m_it l_it / (tokens of the whole step) over every micro-batch of the optimizer step

`policy_loss` returns a (numerator, denominator) pair so that the trainer can add them over the micro-batches
of one optimizer step and divide once: for dapo that is the step's token count; for grpo and dr_grpo it is the
step's completion count; for bnpo each micro-batch is already normalised and the denominator counts micro-batches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")
SCALINGS = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")
STD_EPS = 1e-4


def advantages(rewards: torch.Tensor, num_generations: int, estimator: str = "grpo",
               scale_rewards: str = "group") -> torch.Tensor:
    """Per-completion advantages for rewards (N,) laid out group by group (N = prompts x num_generations).

    grpo: A_i = r_i - mean(group)                    (group-relative baseline)
    rloo: A_i = r_i - mean(group without i) = G/(G-1) (r_i - mean(group))   (leave-one-out baseline)
    then divided by std + 1e-4, where std is the unbiased standard deviation of the rewards within the
    group (scale_rewards="group"), of the whole batch ("batch"), or not at all ("none").
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")
    if scale_rewards not in SCALINGS:
        raise ValueError(f"scale_rewards {scale_rewards!r} is not one of {', '.join(SCALINGS)}")
    G = num_generations
    grouped = rewards.view(-1, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        if G < 2:
            raise ValueError("the leave-one-out baseline needs num_generations >= 2")
        centred = centred * (G / (G - 1))
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True) if G > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + STD_EPS)
    elif scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        centred = centred / (std + STD_EPS)
    return centred.reshape(-1)


class PolicyLoss(NamedTuple):
    numerator: torch.Tensor
    """The batch's share of the loss before the step-wide division (has grad)."""
    denominator: torch.Tensor
    """What the step divides the summed numerators by (see the module docstring)."""
    stats: dict[str, torch.Tensor]
    """Detached per-batch sums for logging: clipped tokens (low, high, region), kl sum, token count."""


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    max_completion_length: int | None = None,
) -> PolicyLoss:
    """The clipped surrogate loss of a micro-batch (formulas in the module docstring).

    logp, old_logp, ref_logp, mask: (B, T) for completion tokens (mask 1 on real tokens, 0 on padding);
    advantages: (B,). old_logp None means on-policy (logp detached). ref_logp is needed when beta > 0.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level {importance_sampling_level!r} is not one of token, sequence")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    lengths = mask.sum(-1).clamp(min=1.0)
    old = logp.detach() if old_logp is None else old_logp
    log_ratio = logp - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / lengths)[:, None].expand_as(logp)
    ratio = torch.exp(log_ratio)
    A = advantages[:, None].to(logp.dtype)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * A, clipped * A)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    summed = per_token * mask
    B = logp.shape[0]
    if loss_type == "grpo":
        numerator, denominator = (summed.sum(-1) / lengths).sum(), B
    elif loss_type == "bnpo":
        numerator, denominator = summed.sum() / mask.sum().clamp(min=1.0), 1
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        numerator, denominator = summed.sum() / max_completion_length, B
    else:  # dapo
        numerator, denominator = summed.sum(), mask.sum()
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (A < 0)
        high = (ratio > 1 + epsilon_high) & (A > 0)
        stats = {
            "clip_low": (low * mask).sum(),
            "clip_high": (high * mask).sum(),
            "clip_region": ((low | high) * mask).sum(),
            "kl": (kl * mask).sum() if kl is not None else mask.new_zeros(()),
            "tokens": mask.sum(),
        }
    return PolicyLoss(numerator, torch.as_tensor(denominator, dtype=logp.dtype), stats)
