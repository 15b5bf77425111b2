"""gazelle VERB [options]: the command-line face of gazelle; one file per verb in this folder."""

from __future__ import annotations

import argparse
import sys

from gazelle.cli import chat, export, generate, grpo, info, sft
from gazelle.errors import GazelleError

VERBS = {"info": info, "generate": generate, "chat": chat, "sft": sft, "grpo": grpo, "export": export}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gazelle", description="Fast, memory-lean fine-tuning and reinforcement learning of open LLMs."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, module in VERBS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.__doc__.splitlines()[0]))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        VERBS[args.verb].run(args)
    except GazelleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
