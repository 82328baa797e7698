"""The `jaxft` command line: `main`, the user-error type, one module per group of commands."""

import importlib
import importlib.util
from typing import Any

from .app import build_parser, main

__all__ = ["CLIError", "build_parser", "main"]


def __getattr__(name: str) -> Any:
    """CLIError (from jaxft.cli.common, which imports JAX: `jaxft --help` needs none of it) and the
    command modules, imported when first asked for."""
    if name == "CLIError":
        return importlib.import_module("jaxft.cli.common").CLIError
    if importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")
