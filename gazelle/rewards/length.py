"""DAPO's soft overlong punishment: a length penalty that ramps from 0 to -1 over the last tokens of the budget.

With L the completion's length in tokens, Lmax = max_completion_length and C = soft_punish_cache:

    R(L) = 0                       L <= Lmax - C
           (Lmax - C - L) / C      Lmax - C < L <= Lmax
           -1                      L > Lmax

so a completion cut off at the budget (L = Lmax) gets -1, and C = 0 is a plain cliff past Lmax.
"""

from __future__ import annotations

from collections.abc import Callable

from gazelle.errors import GazelleError


def overlong_penalty(max_completion_length: int, soft_punish_cache: int) -> Callable[..., list[float]]:
    """A reward function named "overlong_penalty" scoring len(completion_ids[i]) by DAPO's formula above."""
    for name, value in (("max_completion_length", max_completion_length), ("soft_punish_cache", soft_punish_cache)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise GazelleError(f"overlong_penalty: {name} must be an integer, got {value!r}")
    if max_completion_length < 1:
        raise GazelleError(f"overlong_penalty: max_completion_length must be >= 1, got {max_completion_length}")
    if not 0 <= soft_punish_cache <= max_completion_length:
        raise GazelleError(f"overlong_penalty: soft_punish_cache must be in [0, max_completion_length="
                           f"{max_completion_length}], got {soft_punish_cache}")
    free = max_completion_length - soft_punish_cache

    def overlong_penalty(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
        if completion_ids is None:
            raise GazelleError("overlong_penalty needs completion_ids (the token ids of each completion)")
        penalties = []
        for ids in completion_ids:
            length = len(ids)
            if length <= free:
                penalties.append(0.0)
            elif length <= max_completion_length:
                penalties.append((free - length) / soft_punish_cache)
            else:
                penalties.append(-1.0)
        return penalties

    return overlong_penalty
