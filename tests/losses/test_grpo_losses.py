"""GRPO losses and advantages against the formulas written out here, element by element, in float64."""

import math

import pytest
import torch

from gazelle.losses.grpo import advantages, policy_loss

G = 4
REWARDS = [1.0, 0.0, 2.0, 0.5, 3.0, 3.0, 1.0, 0.0]  # two groups of four


def std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages(estimator, scale):
    expected = []
    for g in range(len(REWARDS) // G):
        group = REWARDS[g * G : (g + 1) * G]
        for i, r in enumerate(group):
            if estimator == "grpo":
                a = r - sum(group) / G
            else:
                others = group[:i] + group[i + 1 :]
                a = r - sum(others) / (G - 1)
            divisor = {"group": std(group) + 1e-4, "batch": std(REWARDS) + 1e-4, "none": 1.0}[scale]
            expected.append(a / divisor)
    got = advantages(torch.tensor(REWARDS, dtype=torch.float64), G, estimator, scale)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_identical_rewards_give_zero_advantage():
    got = advantages(torch.full((8,), 0.7, dtype=torch.float64), 4, "grpo", "group")
    assert (got == 0).all()


def case(seed=0):
    """Three completions with 4, 2 and 3 tokens (padded to 4), old and reference log-probs off the current ones."""
    g = torch.Generator().manual_seed(seed)
    logp = (torch.rand(3, 4, generator=g, dtype=torch.float64) * -2).requires_grad_(True)
    old = logp.detach() + torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.3
    ref = logp.detach() + torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.3
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    adv = torch.tensor([1.5, -0.7, 0.2], dtype=torch.float64)
    return logp, old, ref, mask, adv


def written_out(logp, old, ref, mask, adv, loss_type, level, eps_low, eps_high, beta, L):
    """The loss, token by token with Python loops."""
    B, T = logp.shape
    lengths = [int(mask[i].sum()) for i in range(B)]
    per_seq, total, tokens = [], 0.0, sum(lengths)
    for i in range(B):
        seq_log_ratio = sum(logp[i, t] - old[i, t] for t in range(lengths[i])) / lengths[i]
        row = 0.0
        for t in range(lengths[i]):
            w = torch.exp(seq_log_ratio) if level == "sequence" else torch.exp(logp[i, t] - old[i, t])
            clipped = torch.clamp(w, 1 - eps_low, 1 + eps_high)
            term = -torch.minimum(w * adv[i], clipped * adv[i])
            if beta:
                d = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            row = row + term
        per_seq.append(row)
        total = total + row
    if loss_type == "grpo":
        return sum(r / n for r, n in zip(per_seq, lengths)) / B
    if loss_type in ("bnpo", "dapo"):  # one micro-batch: both normalise by its tokens
        return total / tokens
    return total / (B * L)  # dr_grpo


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_policy_loss_and_gradient_equal_the_written_formula(loss_type, level, beta):
    logp, old, ref, mask, adv = case()
    kwargs = dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level=level,
                  beta=beta, ref_logp=ref, max_completion_length=6)
    out = policy_loss(logp, old, adv, mask, **kwargs)
    ours = out.numerator / out.denominator
    (grad_ours,) = torch.autograd.grad(ours, logp)
    expected = written_out(logp, old, ref, mask, adv, loss_type, level, 0.2, 0.28, beta, 6)
    (grad_expected,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_expected, rtol=1e-10, atol=1e-12)
    assert grad_ours.abs().sum() > 0 and (grad_ours[mask == 0] == 0).all()


def test_on_policy_gradient_is_advantage_times_score():
    """old_logp None: ratio 1, and d loss / d logp_it = -A_i / tokens (dapo)."""
    logp, _, _, mask, adv = case()
    out = policy_loss(logp, None, adv, mask, loss_type="dapo")
    (grad,) = torch.autograd.grad(out.numerator / out.denominator, logp)
    torch.testing.assert_close(grad, -adv[:, None] * mask / mask.sum())


def test_step_normalisation_sums_over_micro_batches():
    """dapo over two micro-batches of one step equals dapo over their union; grpo too (same completion count)."""
    logp, old, _, mask, adv = case()
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        whole = policy_loss(logp, old, adv, mask, loss_type=loss_type, max_completion_length=6)
        parts = [policy_loss(logp[s], old[s], adv[s], mask[s], loss_type=loss_type, max_completion_length=6)
                 for s in (slice(0, 1), slice(1, 3))]
        split = sum(p.numerator for p in parts) / sum(p.denominator for p in parts)
        torch.testing.assert_close(split, whole.numerator / whole.denominator)


def test_clip_statistics_count_the_clipped_tokens():
    logp = torch.zeros(2, 2, dtype=torch.float64)
    old = torch.log(torch.tensor([[2.0, 1.0], [0.5, 1.0]], dtype=torch.float64))  # ratios 0.5, 1, 2, 1
    out = policy_loss(logp, old, torch.tensor([-1.0, 1.0], dtype=torch.float64), torch.ones(2, 2),
                      loss_type="dapo", epsilon_low=0.2)
    assert out.stats["clip_low"] == 1 and out.stats["clip_high"] == 1 and out.stats["clip_region"] == 2
