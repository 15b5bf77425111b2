import re

import pytest

from gazelle.errors import GazelleError
from gazelle.tasks.arithmetic import (
    ARITHMETIC_SYSTEM_PROMPT,
    arithmetic_rewards,
    arithmetic_task,
    worked_problem,
)

QUESTION = re.compile(r"What is (.+)\?")


def value_of(question: str) -> int:
    """The test's own evaluation of a generated question (Python's precedence: * before + and -)."""
    expression = QUESTION.fullmatch(question)[1]
    assert re.fullmatch(r"[\d +\-*]+", expression)
    return eval(expression, {"__builtins__": {}})


def test_worked_problem_by_hand():
    assert worked_problem([23, 58], ["+"]) == ("What is 23 + 58?", "81", "23 + 58 = 81")
    assert worked_problem([3, 4, 5], ["+", "*"]) == ("What is 3 + 4 * 5?", "23", "4 * 5 = 20, 3 + 20 = 23")
    assert worked_problem([10, 2, 3, 4], ["-", "*", "-"]) == (
        "What is 10 - 2 * 3 - 4?", "0", "2 * 3 = 6, 10 - 6 = 4, 4 - 4 = 0")
    assert worked_problem([12, 58], ["-"])[1] == "-46"


def test_rows_prompt_and_answers():
    rows = arithmetic_task(20)
    assert len(rows) == 20
    for row in rows:
        system, user, assistant, question = row["prompt"]
        assert system == {"role": "system", "content": ARITHMETIC_SYSTEM_PROMPT}
        assert question == {"role": "user", "content": row["question"]}
        assert user["role"] == "user" and assistant["role"] == "assistant" and user["content"] != row["question"]
        m = re.fullmatch(r"<think>(\d+) \+ (\d+) = (\d+)</think>\n<answer>(\d+)</answer>", assistant["content"])
        assert m and int(m[1]) + int(m[2]) == int(m[3]) == int(m[4]) == value_of(user["content"])
        a, b = map(int, QUESTION.fullmatch(row["question"])[1].split(" + "))
        assert 10 <= a <= 99 and 10 <= b <= 99 and row["answer"] == str(a + b)


def test_worked_examples_earn_the_task_rewards():
    format_reward, correctness = arithmetic_rewards()
    rows = arithmetic_task(10, digits=3, operations="+-*", operands=3, few_shot=2)
    demos = [row["prompt"][i] for row in rows for i in (2, 4)]
    answers = [str(value_of(row["prompt"][i - 1]["content"])) for row in rows for i in (2, 4)]
    assert format_reward(completions=[[d] for d in demos]) == [1.0] * 20
    assert correctness(completions=[[d] for d in demos], answer=answers) == [1.0] * 20
    assert correctness(completions=[[d] for d in demos], answer=[str(int(a) + 1) for a in answers]) == [0.0] * 20


def test_difficulty_settings():
    rows = arithmetic_task(50, digits=3, operations=("-", "*"), operands=4, seed=3)
    for row in rows:
        parts = QUESTION.fullmatch(row["question"])[1].split(" ")
        numbers, signs = parts[::2], parts[1::2]
        assert len(numbers) == 4 and all(100 <= int(x) <= 999 for x in numbers)
        assert set(signs) <= {"-", "*"}
        assert row["answer"] == str(value_of(row["question"]))
    assert {s for row in rows for s in row["question"].split()} >= {"-", "*"}
    one_digit = arithmetic_task(50, digits=1, few_shot=0, system_prompt=None)
    assert all(len(row["prompt"]) == 1 for row in one_digit)
    assert all(0 <= int(x) <= 9 for row in one_digit for x in QUESTION.fullmatch(row["question"])[1].split(" + "))


def test_deterministic_and_disjoint_splits():
    assert arithmetic_task(30, seed=7) == arithmetic_task(30, seed=7)
    assert arithmetic_task(30, seed=7) != arithmetic_task(30, seed=8)
    train = {row["question"] for seed in (0, 1) for row in arithmetic_task(400, seed=seed, few_shot=0)}
    held_out = {row["question"] for seed in (0, 1) for row in arithmetic_task(100, split="eval", seed=seed, few_shot=0)}
    assert len(held_out) > 50 and not train & held_out
    # demonstrations come from the train split, so no eval question is ever shown solved
    demos = {row["prompt"][1]["content"] for row in arithmetic_task(100, split="eval")}
    assert not demos & held_out


def test_bad_arguments():
    with pytest.raises(GazelleError, match=r"arithmetic_task: operations must be a non-empty list of \+, -, \*, got \('/',\)"):
        arithmetic_task(2, operations=("/",))
    with pytest.raises(GazelleError, match=r"arithmetic_task: digits must be an integer in \[1, 18\], got 0"):
        arithmetic_task(2, digits=0)
    with pytest.raises(GazelleError, match="arithmetic_task: split must be one of train, eval, got 'test'"):
        arithmetic_task(2, split="test")
    assert arithmetic_task(0) == []
