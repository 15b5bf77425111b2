"""The think/answer format (R1 style): "<think>short reasoning</think><answer>final answer</answer>".

- think_format_reward: 1.0 when the completion is one think block then one answer block and nothing else
  (whitespace around and between them allowed; no tag inside either block), else 0.0.
- answer_tag_reward: 1.0 when the completion holds a complete <answer>...</answer>, else 0.0.
- answer_reward(tag, column, score): a factory for correctness, `score` when the content of the last <tag>...</tag>
  equals the row's `column` value by `answers_equal` (numbers by value, else normalised text).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gazelle.errors import GazelleError
from gazelle.rewards.math import answers_equal, extract_tag
from gazelle.rewards.text import column as column_values
from gazelle.rewards.text import completion_texts

_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"  # any text that holds none of the four tags
_THINK_ANSWER = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)


def think_format_reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    """1.0 when the completion is "<think>...</think> <answer>...</answer>" and nothing else, else 0.0."""
    return [1.0 if _THINK_ANSWER.fullmatch(t) else 0.0 for t in completion_texts(completions, "think_format_reward")]


def answer_tag_reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    """1.0 when the completion holds a complete <answer>...</answer>, else 0.0."""
    texts = completion_texts(completions, "answer_tag_reward")
    return [0.0 if extract_tag(t, "answer") is None else 1.0 for t in texts]


def answer_reward(tag: str = "answer", column: str = "answer", score: float = 1.0) -> Callable[..., list]:
    """A reward worth `score` when the last <tag>...</tag> of a completion equals the dataset column `column`.

    The function is named "answer_correctness_reward" for the defaults, else "<tag>_<column>_correctness_reward".
    Rows whose `column` value is None score None (the reward does not apply to them).
    """
    if not re.fullmatch(r"[A-Za-z_][\w.-]*", tag):
        raise GazelleError(f"answer_reward: tag {tag!r} is not a valid XML tag name")
    name = "answer_correctness_reward" if (tag, column) == ("answer", "answer") else f"{tag}_{column}_correctness_reward"

    def reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        texts = completion_texts(completions, name)
        golds = column_values(columns, column, len(texts), name)
        return [None if gold is None else score if answers_equal(extract_tag(t, tag), str(gold)) else 0.0
                for t, gold in zip(texts, golds)]

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"{score} when the last <{tag}>...</{tag}> equals column {column!r} (numbers by value), else 0.0."
    return reward


answer_correctness_reward = answer_reward()
