"""The `jaxft` command line: `main`, the user-error type, one module per group of commands."""

from .common import CLIError
from .app import build_parser, main

__all__ = ["CLIError", "build_parser", "main"]
