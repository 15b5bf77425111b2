"""Arithmetic problems of adjustable difficulty: "What is 23 + 58?" -> "81", with a worked example in the prompt.

Difficulty: `digits` per operand (1: 0-9, 2: 10-99, ...), `operands` per problem, `operations` from + - *
(usual precedence: * before + and -, then left to right). Rows are a function of (seed, split) alone, and the two
splits never share a question: each question belongs to "train" or "eval" by a hash of its text (one in ten is
eval), whatever the seed or n. Within a split questions may repeat when the settings allow few of them.

The prompt is a chat: a system message asking for "<think>short reasoning</think><answer>number</answer>", then
`few_shot` worked examples as earlier user/assistant turns (drawn per row from the train split, never the row's own
question), then the question. Small instruct models need the example: SmolLM2-135M-Instruct never wrote the tags
zero-shot and wrote them about 94% of the time with one example, hence few_shot=1.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Sequence

from gazelle.errors import GazelleError
from gazelle.rewards.format import answer_correctness_reward, think_format_reward
from gazelle.tasks.common import chat_prompt, check_int, check_split, draw

ARITHMETIC_SYSTEM_PROMPT = (
    "Solve the arithmetic problem. First think briefly inside <think> </think>, "
    "then write only the final number inside <answer> </answer>."
)
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def arithmetic_task(n: int, digits: int = 2, operations: Sequence[str] | str = ("+",), operands: int = 2,
                    seed: int = 0, split: str = "train", few_shot: int = 1,
                    system_prompt: str | None = ARITHMETIC_SYSTEM_PROMPT) -> list[dict]:
    """`n` rows {"prompt": chat messages, "question": "What is 23 + 58?", "answer": "81"} of one split."""
    task = "arithmetic_task"
    check_int(task, "n", n, 0)
    check_int(task, "digits", digits, 1, 18)
    check_int(task, "operands", operands, 2, 20)
    check_int(task, "few_shot", few_shot, 0, 16)
    check_int(task, "seed", seed, -(2**63))
    check_split(task, split)
    ops = tuple(operations)
    if not ops or any(op not in OPERATIONS for op in ops):
        raise GazelleError(f"{task}: operations must be a non-empty list of {', '.join(OPERATIONS)}, got {operations!r}")

    def make(rng: random.Random) -> tuple[str, str, str]:
        low = 0 if digits == 1 else 10 ** (digits - 1)
        numbers = [rng.randint(low, 10**digits - 1) for _ in range(operands)]
        signs = [rng.choice(ops) for _ in range(operands - 1)]
        return worked_problem(numbers, signs)

    def question_of(problem):
        return problem[0]

    rng = random.Random(f"arithmetic/{split}/{seed}")
    shot_rng = random.Random(f"arithmetic/shots/{seed}")
    rows = []
    for _ in range(n):
        question, answer, _reasoning = draw(task, make, rng, split, question_of)
        shots = []
        for _attempt in range(100 * few_shot):
            if len(shots) == few_shot:
                break
            shot = draw(task, make, shot_rng, "train", question_of)
            if shot[0] != question:
                shots.append((shot[0], f"<think>{shot[2]}</think>\n<answer>{shot[1]}</answer>"))
        if len(shots) < few_shot:
            raise GazelleError(f"{task}: too few distinct train problems for {few_shot} worked examples per row")
        rows.append({"prompt": chat_prompt(system_prompt, shots, question), "question": question, "answer": answer})
    return rows


def worked_problem(numbers: Sequence[int], signs: Sequence[str]) -> tuple[str, str, str]:
    """(question, answer, reasoning) for numbers joined by signs, e.g. ([3, 4, 5], ["+", "*"]) ->
    ("What is 3 + 4 * 5?", "23", "4 * 5 = 20, 3 + 20 = 23"): products first, then sums left to right."""
    question = "What is " + " ".join([str(numbers[0])] + [f"{s} {x}" for s, x in zip(signs, numbers[1:])]) + "?"
    steps = []
    terms, term_signs = [numbers[0]], []
    for sign, x in zip(signs, numbers[1:]):
        if sign == "*":
            steps.append(f"{terms[-1]} * {x} = {terms[-1] * x}")
            terms[-1] *= x
        else:
            terms.append(x)
            term_signs.append(sign)
    total = terms[0]
    for sign, x in zip(term_signs, terms[1:]):
        value = OPERATIONS[sign](total, x)
        steps.append(f"{total} {sign} {x} = {value}")
        total = value
    return question, str(total), ", ".join(steps)


def arithmetic_rewards() -> list:
    """The rewards for this task: the think/answer format (1.0) and a correct answer (1.0)."""
    return [think_format_reward, answer_correctness_reward]
