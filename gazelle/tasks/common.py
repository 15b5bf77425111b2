"""What the task generators share: argument checks, the train/eval split by question hash, chat prompts."""

from __future__ import annotations

import hashlib

from gazelle.errors import GazelleError

SPLITS = ("train", "eval")
EVAL_SHARE = 10  # one problem in ten belongs to the eval split
MAX_MISSES = 100_000  # draws in a row that land in the other split before we give up


def check_int(task: str, name: str, value, low: int, high: int | None = None) -> None:
    """Raise naming `task` and the argument unless `value` is an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise GazelleError(f"{task}: {name} must be an integer {bound}, got {value!r}")


def check_split(task: str, split: str) -> None:
    if split not in SPLITS:
        raise GazelleError(f"{task}: split must be one of {', '.join(SPLITS)}, got {split!r}")


def split_of(key: str) -> str:
    """The split a problem belongs to, fixed by a hash of its text: the same problem never lands in both."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % EVAL_SHARE
    return "eval" if bucket == 0 else "train"


def chat_prompt(system_prompt: str | None, shots: list[tuple[str, str]], question: str) -> list[dict]:
    """[system], then (user, assistant) per worked example, then the user's question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for user, assistant in shots:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": question}]


def draw(task: str, make, rng, split: str, key) -> object:
    """Call make(rng) until it gives a problem of `split` (whose split is `split_of(key(problem))`)."""
    for _ in range(MAX_MISSES):
        problem = make(rng)
        if split_of(key(problem)) == split:
            return problem
    raise GazelleError(f"{task}: no {split} problem in {MAX_MISSES} draws; the settings allow too few distinct "
                       "problems (raise digits, operands or max_number)")
