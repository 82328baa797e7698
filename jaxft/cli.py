"""The `jaxft` command line: one subcommand per job.

Each command module exposes `register(subparsers)`, which adds its parser(s) and sets
`func` (called with the parsed args; returns an exit code). A user mistake raises
`CLIError` (or ValueError/FileNotFoundError) and is reported as one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "jaxft.download",  # download
    "jaxft.commands",  # convert, generate
    "jaxft.recipes.classify",  # finetune-classifier, classify
    "jaxft.recipes.instruct",  # finetune-instruct, respond
    "jaxft.judge",  # judge
)


class CLIError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxft", description="Fine-tune GPT-2 in JAX.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .download import DownloadError
    from .tokenizer import TokenizerNotFoundError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, OSError, DownloadError, TokenizerNotFoundError) as exc:
        # User mistakes and unreachable servers/files: one line, no traceback.
        message = " ".join(str(exc).split("\n"))
        print(f"jaxft {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
