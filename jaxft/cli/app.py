"""The `jaxft` entry point: one subcommand per job.

Each module of `jaxft.cli` exposes `register(subparsers)`, which adds its parser(s) and sets
`func` (called with the parsed args; returns an exit code). A user mistake raises
`CLIError` (or ValueError/FileNotFoundError) and is reported as one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..download import DownloadError
from ..rundir import RunDirError
from ..resume import TrainingStopped
from ..tokenizer import TokenizerNotFoundError
from .common import EXIT_SIGINT, EXIT_USAGE, CLIError, use_compile_cache

COMMAND_MODULES = (
    "jaxft.cli.weights",  # download, convert, generate
    "jaxft.cli.classify",  # finetune-classifier, classify
    "jaxft.cli.instruct",  # finetune-instruct, respond
    "jaxft.cli.judge",  # judge
    "jaxft.cli.sweep",  # sweep-classifier
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxft", description="Fine-tune GPT-2 in JAX.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for messages that repeat the command line
    use_compile_cache(getattr(args, "compile_cache", None))
    try:
        return int(args.func(args) or 0)
    except TrainingStopped as exc:
        # an interruption (130/143, with the command that resumes) or a non-finite loss (1)
        print(f"jaxft {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except RunDirError as exc:
        print(f"jaxft {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CLIError, ValueError, OSError, DownloadError, TokenizerNotFoundError) as exc:
        # User mistakes and unreachable servers/files: one line, no traceback.
        message = " ".join(str(exc).split("\n"))
        print(f"jaxft {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"jaxft {args.command}: interrupted", file=sys.stderr)
        return EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
