"""vLLM's request vocabulary for code written against `fast_generate`: SamplingParams, outputs, LoRA requests.

Notebooks written for Unsloth's vLLM path build `SamplingParams(temperature=0.8, top_p=0.95, max_tokens=1024)`,
read `fast_generate(...)[0].outputs[0].text` and pass `lora_request=model.load_lora(path)`. These classes keep
that code working on gazelle's engine; gazelle's own `gazelle.generation.SamplingParams` stays the engine's
(greedy unless do_sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from gazelle.generation.sampling import SamplingParams as EngineParams


@dataclass
class SamplingParams:
    """vLLM's names and defaults: temperature 0 is greedy, anything above it samples."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 (or 0) keeps every token."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    """Strings that end a completion; the text is cut before the first one."""
    stop_token_ids: list[int] = field(default_factory=list)

    def engine_params(self) -> EngineParams:
        return EngineParams(do_sample=self.temperature > 0, temperature=self.temperature or 1.0,
                            top_k=max(self.top_k, 0), top_p=self.top_p, min_p=self.min_p,
                            repetition_penalty=self.repetition_penalty)


class CompletionOutput(NamedTuple):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    """"stop" (EOS or a stop string) or "length"."""


class RequestOutput(str):
    """One completion's text (a str, as gazelle's fast_generate returns) that also reads like vLLM's output:
    `.outputs` holds every completion of its prompt, `.prompt` the prompt."""

    outputs: list[CompletionOutput]
    prompt: str | list

    def __new__(cls, text: str, prompt, outputs: list[CompletionOutput]):
        obj = super().__new__(cls, text)
        obj.prompt, obj.outputs = prompt, outputs
        return obj


@dataclass
class LoRARequest:
    """A saved adapter to generate with (model.load_lora(path)); its values are swapped in for the call only."""

    lora_path: str
    lora_name: str = "adapter"
    lora_int_id: int = 1


def cut_at_stop(text: str, stop) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
