"""The `jaxft` entry point: one subcommand per job.

Each module of `jaxft.cli` exposes `register(subparsers)`, which adds its parser(s) and sets
`func` (called with the parsed args; returns an exit code). A user mistake raises
`CLIError` (or ValueError/FileNotFoundError) and is reported as one line on stderr, exit 2;
a failed write (`jaxft.fileio.WriteError`) is one line too, exit 1 (jaxft.cli.dispatch).

Start-up: only the chosen command's module is imported (`jaxft --help` lists the commands from
jaxft.cli.commands and imports neither a command module nor JAX).
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

from .. import interrupts
from ..interrupts import exit_code, terminate_raises
from .commands import COMMANDS, EXIT_FAILED, EXIT_SIGINT, EXIT_USAGE

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


def build_parser(modules: typing.Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command of `modules` (default: COMMAND_MODULES)."""
    parser = Parser(prog="jaxft", description="Fine-tune GPT-2 in JAX.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES if modules is None else modules:
        importlib.import_module(name).register(subparsers)
    return parser


def command_list_parser() -> argparse.ArgumentParser:
    """The top level alone (`jaxft --help`, no or an unknown command): every command's name and
    help, none of their flags, no command module imported."""
    parser = Parser(prog="jaxft", description="Fine-tune GPT-2 in JAX.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        if command.module in COMMAND_MODULES:
            subparsers.add_parser(name, help=command.help)
    return parser


def parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for this command line: the named command's module only, else the command list."""
    command = COMMANDS.get(argv[0]) if argv and not argv[0].startswith("-") else None
    if command is None or command.module not in COMMAND_MODULES:
        return command_list_parser()
    return build_parser([command.module])


def main(argv: list[str] | None = None) -> int:
    """The `jaxft` command: its exit status. Run as the command (argv None: sys.argv), a run that
    stopped (a signal, or one process of several failing) ends the process here, at once."""
    words = list(sys.argv[1:] if argv is None else argv)
    args = parser_for(words).parse_args(words)
    args.argv = words  # for messages that repeat the command line
    dispatch = importlib.import_module("jaxft.cli.dispatch")  # (JAX and the error types: once a command runs)
    # a command with safe points (`safe_points`: the fine-tuning commands) checks for a signal at
    # each (jaxft.interrupts); the others stop where it lands
    signals = interrupts.defer_signals() if getattr(args, "safe_points", False) else terminate_raises()
    with warnings.catch_warnings(), signals:
        warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
        try:
            code = dispatch.run(args)
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


if __name__ == "__main__":
    sys.exit(main())
