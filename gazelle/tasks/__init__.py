"""Built-in GRPO tasks: generated arithmetic and Countdown problems, and a loader for local GSM8K-format files.

Each gives a list of rows with a chat "prompt" column plus the columns its rewards read; `get_task(name, **kwargs)`
builds one by the name a YAML config uses, and `task_rewards(name)` gives the reward functions that fit it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from gazelle.errors import GazelleError
from gazelle.tasks.arithmetic import (
    ARITHMETIC_SYSTEM_PROMPT,
    arithmetic_rewards,
    arithmetic_task,
    worked_problem,
)
from gazelle.tasks.countdown import (
    COUNTDOWN_SYSTEM_PROMPT,
    countdown_rewards,
    countdown_task,
)
from gazelle.tasks.gsm8k import gsm8k_rewards, load_gsm8k

# Name -> (rows builder, rewards that fit its rows).
TASKS: dict[str, tuple[Callable[..., list[dict]], Callable[[], list]]] = {
    "arithmetic": (arithmetic_task, arithmetic_rewards),
    "countdown": (countdown_task, countdown_rewards),
    "gsm8k": (load_gsm8k, gsm8k_rewards),
}


def get_task(name: str, **kwargs) -> list[dict]:
    """The rows of built-in task `name`, e.g. get_task("arithmetic", n=64, split="eval") or
    get_task("gsm8k", path="train.jsonl", limit=500)."""
    builder = _builder(name)
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as e:
        params = ", ".join(inspect.signature(builder).parameters)
        raise GazelleError(f"task {name!r}: {e} (its arguments: {params})") from None
    return builder(**kwargs)


def task_rewards(name: str) -> list:
    """The reward functions that fit the rows of task `name`."""
    _builder(name)
    return TASKS[name][1]()


def _builder(name: str) -> Callable[..., list[dict]]:
    if name not in TASKS:
        raise GazelleError(f"unknown task {name!r}; the built-in tasks are: {', '.join(TASKS)}")
    return TASKS[name][0]


__all__ = [
    "ARITHMETIC_SYSTEM_PROMPT", "COUNTDOWN_SYSTEM_PROMPT", "TASKS", "arithmetic_rewards", "arithmetic_task",
    "countdown_rewards", "countdown_task", "get_task", "gsm8k_rewards", "load_gsm8k", "task_rewards",
    "worked_problem",
]
