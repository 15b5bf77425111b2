"""gazelle export --model FOLDER_OR_ADAPTER --to merged_16bit|merged_4bit_forced|lora|gguf [--quant q4_k_m ...] --out DIR: save a model for deployment.

A LoRA adapter folder loads its base (base_model_name_or_path) in 16-bit with the adapter on top, so a QLoRA
adapter merges onto the original weights rather than dequantized ones; when the base is itself a 4-bit checkpoint,
--base-weights names the 16-bit folder to merge onto instead.
"""

from __future__ import annotations

import argparse
import os

from gazelle.cli.common import add_model_argument, model_path, pick_device, pick_dtype
from gazelle.errors import GazelleError
from gazelle.export.merged import SAVE_METHODS, check_save_method
from gazelle.fast import FastLanguageModel

HELP = "export a model or adapter: merged 16-bit or 4-bit safetensors, a LoRA adapter, or GGUF + Ollama Modelfile"
TARGETS = (*SAVE_METHODS, "gguf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--to", required=True, choices=TARGETS, metavar="FORMAT",
                        help=f"what to write: {', '.join(TARGETS)} (merged_4bit is refused: use merged_4bit_forced)")
    parser.add_argument("--out", "-o", required=True, help="output folder (created; existing files of the same names "
                                                           "are replaced)")
    parser.add_argument("--quant", nargs="+", default=None, metavar="METHOD",
                        help="GGUF quantization methods with --to gguf, one file each (default: q8_0)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    parser.add_argument("--base-weights", default=None,
                        help="16-bit folder of the base model, merged onto where the model stores 4-bit weights (a "
                             "-bnb-4bit checkpoint); without it those are dequantized")
    parser.add_argument("--system", default=None, help="SYSTEM message of the Ollama Modelfile (with --to gguf)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16: the dtype loaded and written (default: bf16 on GPU, "
                             "fp32 on CPU)")


def run(args: argparse.Namespace) -> None:
    if args.to != "gguf":
        if args.quant or args.system:
            raise GazelleError(f"--quant and --system apply to --to gguf, not --to {args.to}")
        check_save_method(args.to)  # before loading: a refused method should not cost a model load
    source = model_path(args.model)
    # With --base-weights the 4-bit layers stay 4-bit while loading, so the export knows which weights to take from
    # there (a 16-bit layer loaded this way is checked against them too).
    model, tokenizer = FastLanguageModel.from_pretrained(source, dtype=pick_dtype(args.dtype),
                                                         device_map=str(pick_device(args.device)),
                                                         load_in_4bit=args.base_weights is not None)
    if args.to == "gguf":
        paths = model.save_pretrained_gguf(args.out, tokenizer, quantization_method=args.quant or "q8_0",
                                           system=args.system, base_weights=args.base_weights)
    else:
        paths = model.save_pretrained_merged(args.out, tokenizer, save_method=args.to,
                                             max_shard_size=args.max_shard_size, base_weights=args.base_weights)
    for path in paths:
        print(path)
    size = sum(os.path.getsize(p) for p in paths) / 2**20
    print(f"wrote {len(paths)} files ({size:,.1f} MiB) to {args.out}")
