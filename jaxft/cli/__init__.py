"""The `jaxft` command line: `main`, the user-error type, one module per group of commands."""

from .app import build_parser, main
from .common import CLIError

__all__ = ["CLIError", "build_parser", "main"]
