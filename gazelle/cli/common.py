"""Options and helpers shared by the verbs."""

from __future__ import annotations

import argparse

import torch

from gazelle.errors import GazelleError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", dest="model", default=None,
        help="a model folder, a .gguf file, a hub id or a LoRA adapter folder (default: the embedded SmolLM2)",
    )


def model_path(arg: str | None) -> str:
    if arg:
        return arg
    from gazelle.models.builtin import smollm2_gguf_path

    return smollm2_gguf_path()


def pick_device(arg: str | None) -> torch.device:
    if arg:
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(arg: str | None) -> torch.dtype | None:
    if arg is None:
        return None
    if arg not in DTYPES:
        raise GazelleError(f"--dtype {arg!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[arg]
