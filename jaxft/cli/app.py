"""The `jaxft` entry point: one subcommand per job.

Each module of `jaxft.cli` exposes `register(subparsers)`, which adds its parser(s) and sets
`func` (called with the parsed args; returns an exit code). A user mistake raises
`CLIError` (or ValueError/FileNotFoundError) and is reported as one line on stderr, exit 2;
a failed write (`jaxft.fileio.WriteError`) is one line too, exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
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
from .. import interrupts
from ..interrupts import Terminated, exit_code, terminate_raises
from ..rundir import RunDirError
from ..resume import TrainingStopped
from ..tokenizer import TokenizerNotFoundError
from .common import EXIT_FAILED, EXIT_SIGINT, EXIT_USAGE, CLIError, start_processes, use_compile_cache

COMMAND_MODULES = (
    "jaxft.cli.weights",  # download, convert, generate
    "jaxft.cli.classify",  # finetune-classifier, classify
    "jaxft.cli.instruct",  # finetune-instruct, respond
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
    # a command with safe points (`safe_points`: the fine-tuning commands) checks for a signal at
    # each (jaxft.interrupts); the others stop where it lands
    signals = interrupts.defer_signals() if getattr(args, "safe_points", False) else terminate_raises()
    with warnings.catch_warnings(), signals:
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
        code = int(args.func(args) or 0)
        interrupts.check()  # a signal after the last safe point, or one whose exception Python dropped
        sys.stdout.flush()  # here, where a reader gone away (`| head -1`) is handled below
        return code
    except BrokenPipeError:
        return _reader_gone()
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
        message = " ".join(_os_message(exc).split("\n"))
        print(f"jaxft {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated) outside the training steps
        detail, resume = " ".join(str(exc).split()), getattr(exc, "resume", None)  # resume: set by claimed_run
        print(f"jaxft {args.command}: interrupted{f' ({detail})' if detail else ''}{f'; resume with: {resume}' if resume else ''}",
              file=sys.stderr)
        return exit_code(exc.signum) if isinstance(exc, Terminated) else EXIT_SIGINT


def _os_message(exc: BaseException) -> str:
    """Python's own OSError ("[Errno 13] Permission denied: 'x'") as the other messages read:
    "x: permission denied"; every other error as it is."""
    if isinstance(exc, OSError) and type(exc).__str__ is OSError.__str__ and exc.filename is not None and exc.strerror:
        reason = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else exc.strerror
        return f"{os.fsdecode(exc.filename)}: {reason}"
    return str(exc)


def _reader_gone() -> int:
    """stdout's reader stopped reading (`jaxft classify ... | head -1`): exit quietly with the
    status of a Unix tool that SIGPIPE ended (141; a training run also records it failed);
    stdout goes to /dev/null so that Python's last flush at exit does not complain either
    ("Exception ignored ... BrokenPipeError")."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return exit_code(signal.SIGPIPE)


if __name__ == "__main__":
    sys.exit(main())
