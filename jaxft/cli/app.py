"""The `jaxft` entry point: one subcommand per job.

Each module of `jaxft.cli` exposes `register(subparsers)`, which adds its parser(s) and sets
`func` (called with the parsed args; returns an exit code). A user mistake raises
`CLIError` (or ValueError/FileNotFoundError) and is reported as one line on stderr, exit 2;
a failed write (`jaxft.fileio.WriteError`) is one line too, exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback
import typing
import warnings

import jax

from ..distributed import DistributedError
from ..download import DownloadError
from ..fileio import WriteError
from ..interrupts import Terminated, exit_code, terminate_raises
from ..rundir import RunDirError
from ..resume import TrainingStopped
from ..tokenizer import TokenizerNotFoundError
from .common import EXIT_FAILED, EXIT_SIGINT, EXIT_USAGE, CLIError, start_processes, use_compile_cache

COMMAND_MODULES = (
    "jaxft.cli.weights",  # download, convert, generate
    "jaxft.cli.classify",  # finetune-classifier, classify
    "jaxft.cli.instruct",  # finetune-instruct, respond
    "jaxft.cli.preference",  # finetune-preference
    "jaxft.cli.judge",  # judge
    "jaxft.cli.sweep",  # sweep-classifier
)


class Parser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: `jaxft COMMAND: error: ... (see --help)`
    instead of a usage block; the exit status stays 2. Subcommand parsers are of this
    class too (add_subparsers makes them so)."""

    def error(self, message: str) -> typing.NoReturn:
        message = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jaxft", description="Fine-tune GPT-2 in JAX.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `jaxft` command: its exit status. Run as the command (argv None: sys.argv), a run that
    stopped (a signal, or one process of several failing) ends the process here, at once."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for messages that repeat the command line
    with warnings.catch_warnings(), terminate_raises():
        warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
        try:
            code = _run(args)
        except Exception:  # a bug: its traceback; with several processes, not then JAX's exit barrier (below)
            if argv is None and getattr(args, "processes", 1) > 1:
                traceback.print_exc()
                code = EXIT_FAILED
            else:
                raise
    if argv is None and (code in (EXIT_SIGINT, exit_code(signal.SIGTERM)) or (code and getattr(args, "processes", 1) > 1)):
        # Nothing is left to write (run.json says why it stopped). A normal exit could still crash
        # or hang: XLA may be compiling on other threads when a signal lands during start-up (a
        # segfault at interpreter exit), and JAX's exit waits at a barrier for every process, while
        # the others wait in a collective for this one (they see it fail and stop too).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _one_line_warnings(command: str, default: typing.Callable) -> typing.Callable:
    """jaxft's own warnings (texts cut to the context, a tiny class) as one line on stderr,
    `jaxft COMMAND: warning: ...`, not Python's file:line and source line; others unchanged."""

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("jaxft."):
            print(f"jaxft {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _run(args: argparse.Namespace) -> int:
    try:
        use_compile_cache(getattr(args, "compile_cache", None))
        args.processes = start_processes(args)
        return int(args.func(args) or 0)
    except TrainingStopped as exc:
        # an interruption (130/143, with the command that resumes) or a non-finite loss (1)
        print(f"jaxft {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except WriteError as exc:
        # the work failed writing (a full disk, no permission, a path component that is a
        # file): exit 1; what was written before (checkpoints, earlier outputs) stays intact
        message = " ".join(str(exc).split())
        print(f"jaxft {args.command}: error: {message}", file=sys.stderr)
        return EXIT_FAILED
    except RunDirError as exc:
        print(f"jaxft {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except getattr(jax.errors, "JaxRuntimeError", RuntimeError) as exc:  # (named so from JAX 0.4.34)
        if getattr(args, "processes", 1) == 1:
            raise
        # with several processes, typically a collective whose peer stopped (see its own output)
        print(f"jaxft {args.command}: error: {str(exc).splitlines()[0]} (has another process stopped?)", file=sys.stderr)
        return EXIT_FAILED
    except (CLIError, ValueError, OSError, DownloadError, TokenizerNotFoundError, DistributedError) as exc:
        # User mistakes and unreachable servers/files: one line, no traceback.
        message = " ".join(str(exc).split("\n"))
        print(f"jaxft {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated) outside the training steps
        detail, resume = " ".join(str(exc).split()), getattr(exc, "resume", None)  # resume: set by claimed_run
        print(f"jaxft {args.command}: interrupted{f' ({detail})' if detail else ''}{f'; resume with: {resume}' if resume else ''}",
              file=sys.stderr)
        return exit_code(exc.signum) if isinstance(exc, Terminated) else EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
