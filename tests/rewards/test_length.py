import pytest

from gazelle.errors import GazelleError
from gazelle.rewards.length import overlong_penalty


def test_soft_overlong_punishment():
    reward = overlong_penalty(max_completion_length=10, soft_punish_cache=4)
    assert reward.__name__ == "overlong_penalty"
    ids = [[1] * length for length in (0, 6, 7, 8, 10, 11)]
    # free up to 10 - 4 = 6 tokens, then (6 - L) / 4, then -1 past 10
    assert reward(prompts=[""] * 6, completions=[""] * 6, completion_ids=ids) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    cliff = overlong_penalty(10, 0)
    assert cliff(completion_ids=[[1] * 10, [1] * 11]) == [0.0, -1.0]


def test_bad_settings_and_calls():
    with pytest.raises(GazelleError, match=r"soft_punish_cache must be in \[0, max_completion_length=10\], got 11"):
        overlong_penalty(10, 11)
    with pytest.raises(GazelleError, match="max_completion_length must be an integer"):
        overlong_penalty(10.5, 2)
    with pytest.raises(GazelleError, match="overlong_penalty needs completion_ids"):
        overlong_penalty(10, 2)(prompts=["p"], completions=["c"])
