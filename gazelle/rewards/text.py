"""What every reward function needs: the text of a completion, and a dataset column checked against the batch.

Reward functions follow TRL's convention: `f(prompts, completions, completion_ids=None, **columns)` returns one
float (or None: "does not apply to this row") per completion, where every dataset column arrives by name as a list
with one value per completion. A completion is a string, or for chat-style prompts a list of messages whose last
one is the assistant's reply: `[{"role": "assistant", "content": "..."}]`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gazelle.errors import GazelleError


def completion_text(completion: Any) -> str:
    """A completion (a string, a message, or a list of messages) -> the text of its last message.

    Multimodal contents (lists of {"type": "text", "text": ...} parts) give their text parts joined.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content(completion)
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return _content(completion[-1])
    if isinstance(completion, Sequence) and not completion:
        return ""
    raise GazelleError(f"a completion is a {type(completion).__name__}; expected a string or a list of messages")


def completion_texts(completions: Sequence[Any], reward: str) -> list[str]:
    """The texts of a batch of completions; an unreadable one is named by its index and the reward asking."""
    if isinstance(completions, str) or not isinstance(completions, Sequence):
        raise GazelleError(f"{reward}: completions must be a list (one per sample), got a {type(completions).__name__}")
    texts = []
    for i, completion in enumerate(completions):
        try:
            texts.append(completion_text(completion))
        except GazelleError as e:
            raise GazelleError(f"{reward}: completion {i}: {e}") from None
    return texts


def column(columns: Mapping[str, Any], name: str, count: int, reward: str) -> list:
    """Dataset column `name` from a reward call's keyword arguments, checked to hold one value per completion."""
    if name not in columns:
        have = ", ".join(sorted(k for k in columns if k not in ("completion_ids", "trainer_state"))) or "(none)"
        raise GazelleError(f"{reward} needs dataset column {name!r}; the batch has columns: {have}")
    values = columns[name]
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise GazelleError(f"{reward}: column {name!r} must be a list with one value per completion, "
                           f"got a {type(values).__name__}")
    if len(values) != count:
        raise GazelleError(f"{reward}: column {name!r} has {len(values)} values for {count} completions")
    return list(values)


def _content(message: Mapping) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise GazelleError(f"a message's content is a {type(content).__name__}; expected a string")
