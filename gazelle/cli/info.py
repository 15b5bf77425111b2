"""gazelle info [MODEL]: family, parameter count, stored dtype and memory estimates, without loading weights."""

from __future__ import annotations

import argparse
import json
import os

import torch

from gazelle.cli.common import model_path
from gazelle.models.decoder import Decoder
from gazelle.models.loading import load_config, resolve

HELP = "show a model's family, size, dtype and memory needs"
GIB = 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a model folder, a .gguf file or a hub id (default: the embedded SmolLM2)")


def stored_dtype(source) -> str:
    if source.is_gguf:
        from gazelle.models.gguf_file import gguf_file_type

        return gguf_file_type(source.path)
    with open(os.path.join(source.path, "config.json")) as f:
        hf = json.load(f)
    return str(hf.get("dtype") or hf.get("torch_dtype") or "unknown")


def describe(name_or_path: str) -> dict:
    source = resolve(name_or_path)
    config = load_config(source)
    with torch.device("meta"):
        model = Decoder(config)
    params = model.num_parameters()
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # k and v, 16-bit
    return {
        "model": source.path,
        "family": config.family,
        "parameters": params,
        "stored dtype": stored_dtype(source),
        "layers / hidden / heads (kv)": f"{config.num_layers} / {config.hidden_size} / {config.num_heads} ({config.num_kv_heads})",
        "vocabulary": config.vocab_size,
        "weights in fp32": params * 4 / GIB,
        "weights in bf16": params * 2 / GIB,
        # NF4: 4 bits per weight plus double-quantized absmax (~0.127 bit) on the linear layers only.
        "weights in nf4 (QLoRA)": ((params - linear) * 2 + linear * (4 + 0.127) / 8) / GIB,
        "KV cache per 1k tokens (bf16)": kv_per_token * 1024 / GIB,
    }


def run(args: argparse.Namespace) -> None:
    for key, value in describe(model_path(args.model)).items():
        if isinstance(value, float):
            value = f"{value:.3f} GiB"
        elif isinstance(value, int):
            value = f"{value:,}"
        print(f"{key:>30}: {value}")
