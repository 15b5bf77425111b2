"""The Countdown verifier (the scoring of TinyZero's countdown task): reach `target` with the numbers `nums`.

The equation is the content of the last <answer>...</answer>. It is

- ill-formed, scored 0.0, when there is no answer, or it holds anything but integers, + - * /, parentheses and
  spaces ("=" included: write the expression only), or it does not parse as one arithmetic expression with the
  binary operators + - * / and unary minus (so "2**8", "7//2" and "1 2" are ill-formed);
- well-formed but wrong, scored 0.1, when its numbers are not exactly `nums` (as a multiset: each available
  number used once, none missing, none invented), when it divides by zero, or when its value is not the target;
- right, scored 1.0, when it evaluates to the target (|value - target| < 1e-5).

The expression is evaluated by walking its syntax tree with exact fractions (`ast`, no `eval`): nothing but the
four operations on the given numbers can run, and since only the available numbers appear and there is no power
operator, the value stays small.
"""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

from gazelle.errors import GazelleError
from gazelle.rewards.math import extract_tag
from gazelle.rewards.text import column, completion_texts

FORMAT_SCORE = 0.1
CORRECT_SCORE = 1.0
TOLERANCE = 1e-5
MAX_EQUATION_CHARS = 500
_ALLOWED_CHARS = re.compile(r"[\d+\-*/()\s]+")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class IllFormed(ValueError):
    """The equation is not an arithmetic expression over integers."""


def parse_equation(equation: str) -> ast.expr:
    """The syntax tree of an allowed expression; IllFormed for anything else."""
    if len(equation) > MAX_EQUATION_CHARS or not _ALLOWED_CHARS.fullmatch(equation):
        raise IllFormed("characters other than integers, + - * / ( ) and spaces")
    try:
        tree = ast.parse(equation.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise IllFormed(f"does not parse: {e}") from None
    for node in ast.walk(tree):
        allowed = (isinstance(node, ast.BinOp) and type(node.op) in _BINARY
                   or isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                   or isinstance(node, ast.Constant) and type(node.value) is int
                   or isinstance(node, ast.operator | ast.unaryop))
        if not allowed:
            raise IllFormed(f"{type(node).__name__} is not allowed")
    return tree


def numbers_used(tree: ast.expr) -> list[int]:
    """The integer literals of an expression (in no particular order)."""
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]


def evaluate(tree: ast.expr) -> Fraction:
    """The exact value of a tree from `parse_equation`; ZeroDivisionError when it divides by zero."""
    if isinstance(tree, ast.Constant):
        return Fraction(tree.value)
    if isinstance(tree, ast.UnaryOp):
        return -evaluate(tree.operand)
    return _BINARY[type(tree.op)](evaluate(tree.left), evaluate(tree.right))


def score_equation(equation: str | None, nums: Sequence[int], target: float) -> float:
    """0.0 ill-formed or missing, 0.1 well-formed but wrong (numbers misused, division by zero, other value), 1.0."""
    if equation is None:
        return 0.0
    try:
        tree = parse_equation(equation)
    except IllFormed:
        return 0.0
    if Counter(numbers_used(tree)) != Counter(nums):
        return FORMAT_SCORE
    try:
        value = evaluate(tree)
    except (ZeroDivisionError, RecursionError):
        return FORMAT_SCORE
    return CORRECT_SCORE if abs(value - Fraction(target)) < TOLERANCE else FORMAT_SCORE


def countdown_reward(prompts=None, completions=None, completion_ids=None, *, nums, target, **_) -> list[float | None]:
    """Countdown: 1.0 when the last <answer> is an expression using each of `nums` once that equals `target`,
    0.1 when well-formed but wrong, 0.0 when missing or ill-formed; None for rows whose nums or target is None."""
    texts = completion_texts(completions, "countdown_reward")
    columns = {"nums": nums, "target": target}
    all_nums = column(columns, "nums", len(texts), "countdown_reward")
    targets = column(columns, "target", len(texts), "countdown_reward")
    scores: list[float | None] = []
    for i, (text, row_nums, row_target) in enumerate(zip(texts, all_nums, targets)):
        if row_nums is None or row_target is None:
            scores.append(None)
            continue
        if not isinstance(row_nums, Sequence) or isinstance(row_nums, str) or not all(isinstance(n, int) and not isinstance(n, bool) for n in row_nums):
            raise GazelleError(f"countdown_reward: row {i}: column 'nums' must be a list of integers, got {row_nums!r}")
        if isinstance(row_target, bool) or not isinstance(row_target, int | float | Fraction):
            raise GazelleError(f"countdown_reward: row {i}: column 'target' must be a number, got {row_target!r}")
        scores.append(score_equation(extract_tag(text, "answer"), row_nums, row_target))
    return scores
