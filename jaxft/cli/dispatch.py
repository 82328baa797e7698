"""Running a parsed `jaxft` command: its exit status, with one-line errors (see jaxft.cli.app).
Imported once a command is chosen, so that `jaxft --help` needs none of this (nor JAX)."""

from __future__ import annotations

import argparse
import sys

import jax

from ..distributed import DistributedError
from ..download import DownloadError
from ..fileio import WriteError
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
