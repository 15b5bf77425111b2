"""Countdown problems (TinyZero's task): reach the target with the given numbers, each used once, + - * /.

Every target is reachable by construction: the numbers are drawn first, then combined two at a time by a random
operation whose result is a positive integer (subtraction only from the larger number, division only when exact)
until one value is left; that value is the target, kept when it lies in [1, max_target]. The construction is
recorded in the row ("solution", an expression the Countdown verifier scores 1.0). Rows are a function of
(seed, split) alone, and a problem (its numbers and target) belongs to "train" or "eval" by a hash, so the splits
never share one.
"""

from __future__ import annotations

import operator
import random

from gazelle.errors import GazelleError
from gazelle.rewards.countdown import countdown_reward
from gazelle.rewards.format import think_format_reward
from gazelle.tasks.common import chat_prompt, check_int, check_split, draw

COUNTDOWN_SYSTEM_PROMPT = (
    "Solve the numbers puzzle. First think briefly inside <think> </think>, "
    "then write only the equation inside <answer> </answer>."
)
QUESTION = ("Using the numbers {nums}, create an equation that equals {target}. You can use +, -, * and /, and each "
            "number exactly once. Write only the expression, without '=', for example <answer>(1 + 2) / 3</answer>.")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
MAX_TRIES = 10_000


def countdown_task(n: int, num_count: int = 4, max_number: int = 100, seed: int = 0, split: str = "train",
                   min_number: int = 1, max_target: int = 100, few_shot: int = 1,
                   system_prompt: str | None = COUNTDOWN_SYSTEM_PROMPT) -> list[dict]:
    """`n` rows {"prompt": chat messages, "nums": [...], "target": int, "solution": "expression"} of one split."""
    task = "countdown_task"
    check_int(task, "n", n, 0)
    check_int(task, "num_count", num_count, 2, 8)
    check_int(task, "min_number", min_number, 1)
    check_int(task, "max_number", max_number, min_number)
    check_int(task, "max_target", max_target, 1)
    check_int(task, "few_shot", few_shot, 0, 16)
    check_int(task, "seed", seed, -(2**63))
    check_split(task, split)

    def make(rng: random.Random) -> dict:
        for _ in range(MAX_TRIES):
            nums = [rng.randint(min_number, max_number) for _ in range(num_count)]
            target, solution, steps = build(nums, rng)
            if 1 <= target <= max_target:
                rng.shuffle(nums)  # the order of the numbers must not give the construction away
                return {"nums": nums, "target": target, "solution": solution, "steps": steps}
        raise GazelleError(f"{task}: no target in [1, {max_target}] found in {MAX_TRIES} tries; raise max_target")

    def key(problem: dict) -> str:
        return f"{sorted(problem['nums'])} -> {problem['target']}"

    rng = random.Random(f"countdown/{split}/{seed}")
    shot_rng = random.Random(f"countdown/shots/{seed}")
    rows = []
    for _ in range(n):
        problem = draw(task, make, rng, split, key)
        shots = [draw(task, make, shot_rng, "train", key) for _ in range(few_shot)]
        shot_turns = [(QUESTION.format(nums=s["nums"], target=s["target"]),
                       f"<think>{', '.join(s['steps'])}</think>\n<answer>{s['solution']}</answer>") for s in shots]
        question = QUESTION.format(nums=problem["nums"], target=problem["target"])
        rows.append({"prompt": chat_prompt(system_prompt, shot_turns, question), "nums": problem["nums"],
                     "target": problem["target"], "solution": problem["solution"]})
    return rows


def build(nums: list[int], rng: random.Random) -> tuple[int, str, list[str]]:
    """Combine all of `nums` at random into (value, expression, steps), every intermediate a positive integer."""
    pool = [(x, str(x), False) for x in nums]  # (value, expression, whether the expression needs parentheses)
    steps = []
    while len(pool) > 1:
        a, b = (pool.pop(rng.randrange(len(pool))) for _ in range(2))
        if a[0] < b[0]:
            a, b = b, a  # subtract and divide from the larger value
        ops = ["+", "*"] + (["-"] if a[0] > b[0] else []) + (["/"] if a[0] % b[0] == 0 else [])
        op = rng.choice(ops)
        value = _APPLY[op](a[0], b[0])
        steps.append(f"{a[0]} {op} {b[0]} = {value}")
        pool.append((value, f"{_wrap(a)} {op} {_wrap(b)}", True))
    value, expression, _ = pool[0]
    return value, expression, steps


def _wrap(item: tuple[int, str, bool]) -> str:
    return f"({item[1]})" if item[2] else item[1]


def countdown_rewards() -> list:
    """The rewards for this task: the think/answer format (1.0) and the Countdown verifier (0 / 0.1 / 1.0)."""
    return [think_format_reward, countdown_reward]
