"""Built-in reward functions for GRPO, in TRL's convention: `f(prompts, completions, completion_ids=None, **columns)`
returns one float (or None: "not applicable") per completion; every dataset column arrives by name as a list.

`get_reward(name, **options)` maps the short names a YAML config uses to functions (factories take options).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from gazelle.errors import GazelleError
from gazelle.rewards.code import (
    code_execution_reward,
    code_reward,
    extract_code,
    run_tests,
)
from gazelle.rewards.countdown import countdown_reward, score_equation
from gazelle.rewards.format import (
    answer_correctness_reward,
    answer_reward,
    answer_tag_reward,
    think_format_reward,
)
from gazelle.rewards.gsm8k import (
    GSM8K_REWARDS,
    SYSTEM_PROMPT,
    correctness_reward_func,
    count_xml,
    int_reward_func,
    soft_format_reward_func,
    strict_format_reward_func,
    xmlcount_reward_func,
)
from gazelle.rewards.length import overlong_penalty
from gazelle.rewards.math import (
    answers_equal,
    extract_hash_answer,
    extract_tag,
    extract_xml_answer,
    parse_number,
)
from gazelle.rewards.text import completion_text

# Short name -> reward function.
REWARDS: dict[str, Callable] = {
    "gsm8k_correctness": correctness_reward_func,
    "gsm8k_int": int_reward_func,
    "strict_format": strict_format_reward_func,
    "soft_format": soft_format_reward_func,
    "xmlcount": xmlcount_reward_func,
    "think_format": think_format_reward,
    "answer_tag": answer_tag_reward,
    "answer_correctness": answer_correctness_reward,
    "countdown": countdown_reward,
}
# Short name -> factory: get_reward passes its options to these, e.g. get_reward("overlong", max_completion_length=
# 256, soft_punish_cache=64).
REWARD_FACTORIES: dict[str, Callable[..., Callable]] = {
    "overlong": overlong_penalty,
    "code": code_execution_reward,
    "answer": answer_reward,
}


def get_reward(name: str, **options) -> Callable:
    """The built-in reward called `name`; for a factory ("overlong", "code", "answer"), built with `options`."""
    if name in REWARDS:
        if options:
            raise GazelleError(f"reward {name!r} takes no options, got: {', '.join(options)}")
        return REWARDS[name]
    if name in REWARD_FACTORIES:
        factory = REWARD_FACTORIES[name]
        try:
            inspect.signature(factory).bind(**options)
        except TypeError as e:
            params = ", ".join(inspect.signature(factory).parameters)
            raise GazelleError(f"reward {name!r}: {e} (its options: {params})") from None
        return factory(**options)
    raise GazelleError(f"unknown reward {name!r}; the built-in rewards are: {', '.join([*REWARDS, *REWARD_FACTORIES])}")


__all__ = [
    "GSM8K_REWARDS", "REWARDS", "REWARD_FACTORIES", "SYSTEM_PROMPT", "answer_correctness_reward", "answer_reward",
    "answer_tag_reward", "answers_equal", "code_execution_reward", "code_reward", "completion_text",
    "correctness_reward_func", "count_xml", "countdown_reward", "extract_code", "extract_hash_answer", "extract_tag",
    "extract_xml_answer", "get_reward", "int_reward_func", "overlong_penalty", "parse_number", "run_tests",
    "score_equation", "soft_format_reward_func", "strict_format_reward_func", "think_format_reward",
    "xmlcount_reward_func",
]
