"""What every command shares: the user-error type, exit codes, argparse value types."""

from __future__ import annotations

import argparse

EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed (non-finite loss, a write error)
EXIT_USAGE = 2  # a user mistake: bad flag, missing file, malformed data
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class CLIError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def on_off(value: str) -> bool:
    """argparse type for on/off flags (1/0, true/false, yes/no, on/off)."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {value!r}")
