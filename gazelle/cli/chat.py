"""gazelle chat [--model MODEL] [--system TEXT] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--device D] [--dtype D]: talk to a chat model.

Each turn renders the whole conversation with the model's chat template and streams the reply.
Commands: /reset clears the history (the system message stays), /system TEXT sets it, /exit or /quit ends.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gazelle.cli.common import add_model_argument, model_path, pick_device, pick_dtype
from gazelle.errors import GazelleError
from gazelle.fast import FastLanguageModel
from gazelle.generation.engine import stop_token_ids
from gazelle.generation.reference import generate
from gazelle.generation.sampling import SamplingParams
from gazelle.generation.streamer import TextStreamer

HELP = "chat with a model in the terminal, keeping the conversation"


@dataclass
class ReplyParams:
    sampling: SamplingParams
    max_new_tokens: int
    generator: torch.Generator | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="the longest reply, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")


def build_messages(history: list[dict], user_text: str, system: str | None) -> list[dict]:
    """The conversation to render: the system message, the turns so far, and the new user turn."""
    return ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": user_text}]


def render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def reply(model, tokenizer, messages: list[dict], params: ReplyParams, on_text: Callable[[str], object]) -> str:
    """Generate the assistant's answer to `messages`, passing each new piece of text to on_text as it is made."""
    prompt = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    streamer = TextStreamer(tokenizer, write=on_text)
    eos = stop_token_ids(tokenizer, model.config)

    def on_token(token: torch.Tensor) -> None:
        if int(token[0]) not in eos:
            streamer.put([int(token[0])])

    generate(model, torch.tensor([prompt], device=model.device), max_new_tokens=params.max_new_tokens,
             params=params.sampling, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id or 0,
             generator=params.generator, on_token=on_token)
    return streamer.text


def converse(model, tokenizer, params: ReplyParams, system: str | None) -> None:
    """Read user turns from stdin until /exit, EOF or Ctrl-C at the prompt."""
    tty = sys.stdin.isatty()
    history: list[dict] = []
    pieces: list[str] = []  # the reply so far, kept if Ctrl-C stops it

    def on_text(text: str) -> None:
        pieces.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        try:
            if tty:  # on stderr, so that stdout holds only the replies
                print("> ", end="", file=sys.stderr, flush=True)
            line = input().strip()
        except (EOFError, KeyboardInterrupt):
            if tty:
                print(file=sys.stderr)
            return
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if command == "/system":
            system = rest.strip() or None
            print(f"(system message {'set' if system else 'cleared'})", file=sys.stderr)
            continue
        if command.startswith("/"):
            print(f"(unknown command {command}: use /reset, /system TEXT or /exit)", file=sys.stderr)
            continue
        pieces.clear()
        try:
            answer = reply(model, tokenizer, build_messages(history, line, system), params, on_text)
        except KeyboardInterrupt:  # Ctrl-C mid-reply: keep what was said, back to the prompt
            answer = "".join(pieces)
            print(" (stopped)", end="", file=sys.stderr, flush=True)
        print(flush=True)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


def run(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise GazelleError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    sampling = SamplingParams(do_sample=args.temperature > 0, temperature=args.temperature, top_p=args.top_p)
    source = model_path(args.model)
    device = pick_device(args.device)
    model, tokenizer = FastLanguageModel.from_pretrained(source, dtype=pick_dtype(args.dtype), device_map=str(device))
    if not tokenizer.chat_template:
        raise GazelleError(f"the tokenizer of {source} has no chat template: use a chat model, "
                           "or `gazelle generate` without --chat for plain completion")
    model = FastLanguageModel.for_inference(model)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    converse(model, tokenizer, ReplyParams(sampling, args.max_new_tokens, generator), args.system)
