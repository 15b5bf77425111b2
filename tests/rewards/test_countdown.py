import pytest

from gazelle.errors import GazelleError
from gazelle.rewards.countdown import countdown_reward


def score(equation, nums=(3, 5, 7), target=22):
    text = equation if equation is None or "<answer>" in equation else f"<think>...</think><answer>{equation}</answer>"
    return countdown_reward(prompts=["q"], completions=[text or "no answer"], nums=[list(nums)], target=[target])[0]


@pytest.mark.parametrize(("equation", "expected"), [
    ("3 * 5 + 7", 1.0),                # 15 + 7 = 22
    ("(7 + 5) * 3 - 14", 0.1),         # invents 14
    ("(7 + 5) * 3", 0.1),              # = 36: right numbers, wrong value
    ("5 * 5 - 3", 0.1),                # = 22, but 5 twice and no 7
    ("15 + 7", 0.1),                   # = 22, numbers not the available ones
    ("3 * 5 + 7 + 0", 0.1),            # an extra number
    ("3 * 5 + 7 = 22", 0.0),           # "=" is not allowed
    ("3.0 * 5 + 7", 0.0),              # integers only
    ("3 ** 5 + 7", 0.0),               # allowed characters, but no power operator
    ("7 // 5 + 3", 0.0),               # nor floor division
    ("3 5 7", 0.0),                    # does not parse
    ("__import__('os')", 0.0),
    ("(" * 300 + "3" + ")" * 300, 0.0),
    (None, 0.0),                       # no <answer> at all
])
def test_scores(equation, expected):
    assert score(equation) == expected


def test_exact_fractions_unary_minus_division_by_zero_and_last_answer():
    assert score("6 / (3 / 4)", nums=(3, 4, 6), target=8) == 1.0  # 6 / 0.75 = 8, intermediate not an integer
    assert score("-2 + 5", nums=(2, 5), target=3) == 1.0
    assert score("5 / (3 - 3)", nums=(3, 3, 5), target=5) == 0.1
    assert score("<answer>3 + 5</answer> hmm, better: <answer>3 * 5 + 7</answer>") == 1.0
    assert score("1 / 3 + 1 / 3 + 1 / 3", nums=(1, 1, 1, 3, 3, 3), target=1) == 1.0


def test_rows_and_columns():
    completions = [[{"role": "assistant", "content": "<answer>3 * 5 + 7</answer>"}], "<answer>2 + 2</answer>"]
    assert countdown_reward(prompts=["a", "b"], completions=completions, nums=[[3, 5, 7], None],
                            target=[22, 4]) == [1.0, None]
    with pytest.raises(GazelleError, match="countdown_reward: row 1: column 'nums' must be a list of integers"):
        countdown_reward(prompts=["a", "b"], completions=["x", "y"], nums=[[1], "3,5,7"], target=[1, 2])
    with pytest.raises(GazelleError, match="column 'target' has 1 values for 2 completions"):
        countdown_reward(prompts=["a", "b"], completions=["x", "y"], nums=[[1], [2]], target=[1])
