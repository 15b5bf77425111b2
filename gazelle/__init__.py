"""gazelle: fast, memory-lean fine-tuning and reinforcement learning of open LLMs.

    from gazelle import FastLanguageModel, SFTTrainer, SFTConfig, TrainingArguments, is_bfloat16_supported
    from gazelle.chat_templates import get_chat_template, train_on_responses_only, standardize_sharegpt
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Resolved on first use, so `import gazelle` (and the CLI's start-up) stays light.
_EXPORTS = {
    "FastLanguageModel": "gazelle.fast",
    "is_bfloat16_supported": "gazelle.fast",
    "SFTTrainer": "gazelle.trainers.sft",
    "SFTConfig": "gazelle.trainers.sft",
    "TrainingArguments": "gazelle.trainers.config",
    "GazelleError": "gazelle.errors",
    "load": "gazelle.models.loading",
    "TextStreamer": "gazelle.generation.streamer",
    "GRPOTrainer": "gazelle.trainers.grpo",
    "GRPOConfig": "gazelle.trainers.grpo",
    "SamplingParams": "gazelle.generation.requests",
    "PatchFastRL": "gazelle.fast",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gazelle' has no attribute {name!r}")
