"""Running a parsed `jaxft` command: its exit status, with one-line errors (see jaxft.cli.app).
Imported once a command is chosen, so that `jaxft --help` needs none of this (nor JAX)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys

import jax

from ..distributed import DistributedError
from ..download import DownloadError
from ..fileio import WriteError
from .. import interrupts
from ..interrupts import Terminated, exit_code
from ..rundir import RunDirError
from ..resume import TrainingStopped
from ..tokenizer import TokenizerNotFoundError
from .common import EXIT_FAILED, EXIT_SIGINT, EXIT_USAGE, CLIError, start_processes, use_compile_cache


def run(args: argparse.Namespace) -> int:
    """`args.func(args)` after the compilation cache and the processes are set up; errors as exit codes."""
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
