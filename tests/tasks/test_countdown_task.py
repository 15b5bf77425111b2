import re
from fractions import Fraction

import pytest

from gazelle.errors import GazelleError
from gazelle.rewards.countdown import countdown_reward
from gazelle.tasks.countdown import build, countdown_rewards, countdown_task


def test_every_target_is_reached_by_its_construction():
    for num_count in (3, 4):
        rows = countdown_task(60, num_count=num_count, seed=num_count)
        for row in rows:
            nums, target, solution = row["nums"], row["target"], row["solution"]
            assert len(nums) == num_count and all(1 <= x <= 100 for x in nums) and 1 <= target <= 100
            assert sorted(map(int, re.findall(r"\d+", solution))) == sorted(nums)
            assert re.fullmatch(r"[\d +\-*/()]+", solution)
            assert eval(solution, {"__builtins__": {}}) == pytest.approx(target)
        completions = [f"<think>...</think><answer>{row['solution']}</answer>" for row in rows]
        scores = countdown_reward(prompts=[r["prompt"] for r in rows], completions=completions,
                                  nums=[r["nums"] for r in rows], target=[r["target"] for r in rows])
        assert scores == [1.0] * len(rows)


def test_construction_steps_are_positive_integers():
    import random

    rng = random.Random(0)
    for _ in range(200):
        nums = [rng.randint(1, 30) for _ in range(4)]
        value, _expression, steps = build(nums, rng)
        assert len(steps) == 3
        for step in steps:
            a, op, b, _, result = step.split()
            exact = {"+": Fraction(int(a)) + int(b), "-": Fraction(int(a)) - int(b), "*": Fraction(int(a)) * int(b),
                     "/": Fraction(int(a), int(b))}[op]
            assert exact == int(result) and int(result) > 0
        assert int(steps[-1].split()[-1]) == value


def test_prompt_and_worked_example():
    row = countdown_task(1, num_count=3, max_number=20, seed=5)[0]
    system, demo_user, demo_assistant, user = row["prompt"]
    assert system["role"] == "system" and "<answer>" in system["content"]
    assert f"Using the numbers {row['nums']}, create an equation that equals {row['target']}." in user["content"]
    m = re.search(r"numbers \[(.+)\], create an equation that equals (\d+)", demo_user["content"])
    demo_nums, demo_target = [int(x) for x in m[1].split(", ")], int(m[2])
    assert [f(completions=[demo_assistant["content"]], nums=[demo_nums], target=[demo_target])[0]
            for f in countdown_rewards()] == [1.0, 1.0]
    assert len(countdown_task(1, few_shot=0, system_prompt=None)[0]["prompt"]) == 1


def test_deterministic_and_disjoint_splits():
    assert countdown_task(10, seed=1) == countdown_task(10, seed=1)
    assert countdown_task(10, seed=1) != countdown_task(10, seed=2)

    def keys(rows):
        return {(tuple(sorted(r["nums"])), r["target"]) for r in rows}

    train = keys(countdown_task(300, num_count=3, max_number=10, few_shot=0))
    held_out = keys(countdown_task(60, num_count=3, max_number=10, split="eval", few_shot=0))
    assert len(held_out) > 20 and not train & held_out


def test_bad_arguments():
    with pytest.raises(GazelleError, match=r"countdown_task: num_count must be an integer in \[2, 8\], got 1"):
        countdown_task(2, num_count=1)
    with pytest.raises(GazelleError, match="countdown_task: max_number must be an integer >= 5, got 3"):
        countdown_task(2, min_number=5, max_number=3)
