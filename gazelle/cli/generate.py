"""gazelle generate [--model MODEL] --prompt TEXT [--chat] [--max-new-tokens N]: stream a completion."""

from __future__ import annotations

import argparse

import torch

from gazelle.cli.common import add_model_argument, model_path, pick_device, pick_dtype
from gazelle.errors import GazelleError
from gazelle.generation.engine import stop_token_ids
from gazelle.generation.reference import generate
from gazelle.generation.sampling import SamplingParams
from gazelle.generation.streamer import TextStreamer
from gazelle.fast import FastLanguageModel

HELP = "generate text from a prompt, streamed to the terminal"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--prompt", "-p", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")


def encode_prompt(tokenizer, prompt: str, chat: bool, system: str | None, source: str) -> list[int]:
    if not chat:
        return tokenizer(prompt)["input_ids"]
    if not tokenizer.chat_template:
        raise GazelleError(f"the tokenizer of {source} has no chat template: drop --chat, or use a chat model")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise GazelleError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    source = model_path(args.model)
    device = pick_device(args.device)
    # FastLanguageModel also takes a saved LoRA adapter folder (its base model comes from adapter_config.json).
    model, tokenizer = FastLanguageModel.from_pretrained(source, dtype=pick_dtype(args.dtype), device_map=str(device))
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat, args.system, source)
    if not prompt_ids:
        raise GazelleError(f"--prompt {args.prompt!r} encodes to no tokens with the tokenizer of {source}")
    params = SamplingParams(do_sample=args.temperature > 0, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p)
    streamer = TextStreamer(tokenizer)
    eos = stop_token_ids(tokenizer, model.config)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def on_token(token: torch.Tensor) -> None:
        if int(token[0]) not in eos:
            streamer.put([int(token[0])])

    generate(model, torch.tensor([prompt_ids], device=device), max_new_tokens=args.max_new_tokens, params=params,
             eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, generator=generator, on_token=on_token)
    streamer.end()
