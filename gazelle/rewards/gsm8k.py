"""The GSM8K reward set of the widely copied GRPO recipe (willccbb's gist, used by Unsloth's Qwen2.5 notebook).

The model is asked (SYSTEM_PROMPT) to answer as

    <reasoning>
    ...
    </reasoning>
    <answer>
    ...
    </answer>

and five rewards score each completion; GSM8K_REWARDS lists them in the recipe's order. Scores are the recipe's.
Where we differ from it, on purpose:
- The answer is the content of the last complete <answer>...</answer> (`extract_xml_answer`); the recipe falls
  back to the whole text when the tag is missing.
- correctness compares numbers ("1,000" == "1000" == "1000.0"); the recipe compares strings exactly.
- int accepts a leading minus ("-3"); the recipe uses str.isdigit.
- The format regexes use DOTALL, so reasoning may span lines (the recipe's strict pattern has no flags, so it only
  matched one-line reasoning). strict is anchored at both ends and needs the final newline after </answer>, as in
  the recipe; soft is anchored at the start only.
- xmlcount: see `count_xml`.
"""

from __future__ import annotations

import re

from gazelle.rewards.math import answers_equal, extract_xml_answer, is_integer_answer
from gazelle.rewards.text import column, completion_texts

SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""

_STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.DOTALL)
_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
TAG_SCORE = 0.125
TRAILING_CHAR_PENALTY = 0.001


def count_xml(text: str) -> float:
    """0.125 for each of "<reasoning>\\n", "\\n</reasoning>\\n", "\\n<answer>\\n", "\\n</answer>" found exactly once,
    minus 0.001 per character after the answer, charged twice: by the "\\n<answer>\\n" part and by the "\\n</answer>"
    part (each only when its tag counted).

    "After the answer" is the text after the last "\\n</answer>" less one newline; none when there is no
    "\\n</answer>". This equals the recipe whenever the completion contains "\\n</answer>\\n". The recipe differs
    when it does not: for a completion ending right at "\\n</answer>" it charges the whole completion's length
    (its split finds no "\\n</answer>\\n") and then pays 0.001 back; we charge nothing.
    """
    score = 0.0
    _, closed, after = text.rpartition("\n</answer>")
    trailing = len(after.removeprefix("\n")) if closed else 0
    if text.count("<reasoning>\n") == 1:
        score += TAG_SCORE
    if text.count("\n</reasoning>\n") == 1:
        score += TAG_SCORE
    if text.count("\n<answer>\n") == 1:
        score += TAG_SCORE - trailing * TRAILING_CHAR_PENALTY
    if text.count("\n</answer>") == 1:
        score += TAG_SCORE - trailing * TRAILING_CHAR_PENALTY
    return score


def xmlcount_reward_func(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    """Up to 0.5: 0.125 per canonical tag present once, less 0.001 per trailing character (see `count_xml`)."""
    return [count_xml(t) for t in completion_texts(completions, "xmlcount_reward_func")]


def soft_format_reward_func(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    """0.5 when the completion starts with <reasoning>...</reasoning> followed by <answer>...</answer>."""
    return [0.5 if _SOFT.match(t) else 0.0 for t in completion_texts(completions, "soft_format_reward_func")]


def strict_format_reward_func(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    """0.5 when the completion is exactly "<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n"."""
    return [0.5 if _STRICT.match(t) else 0.0 for t in completion_texts(completions, "strict_format_reward_func")]


def int_reward_func(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    """0.5 when the extracted answer is an integer (digits with an optional sign)."""
    texts = completion_texts(completions, "int_reward_func")
    return [0.5 if is_integer_answer(extract_xml_answer(t)) else 0.0 for t in texts]


def correctness_reward_func(prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
    """2.0 when the extracted answer equals column `answer` as a number (or as text); None where `answer` is None."""
    texts = completion_texts(completions, "correctness_reward_func")
    golds = column(columns, "answer", len(texts), "correctness_reward_func")
    return [None if gold is None else 2.0 if answers_equal(extract_xml_answer(t), str(gold)) else 0.0
            for t, gold in zip(texts, golds)]


GSM8K_REWARDS = [xmlcount_reward_func, soft_format_reward_func, strict_format_reward_func, int_reward_func,
                 correctness_reward_func]
