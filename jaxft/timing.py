"""Where a run's time goes: metrics.json's `timing` object (README, "Compilation and where the
time goes"), and `run_info`, where and when it ran.

Phases add their seconds (`with timing.phase("data_s"):`); marks are seconds since the process
started (`first_step_s`, `total_s`). Compilation is counted separately (jaxft.programs): it
overlaps the phases, so compile_s is not part of a sum.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from typing import Any, Iterator

import jax

from .programs import CompileStats, compile_stats

PHASES = ("data_s", "model_s", "trunk_s", "train_s", "eval_s", "outputs_s")
KEYS = ("startup_s", "data_s", "model_s", "compile_s", "compiles", "compile_cache_hits", "trunk_s", "train_s", "eval_s",
        "outputs_s", "first_step_s", "total_s")


def _process_start() -> float:
    """The process's start on the time.perf_counter() clock: from /proc on Linux (the kernel's
    start time in clock ticks since boot), else the time this module was first imported."""
    now = time.perf_counter()
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after "(comm)", which may hold spaces
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return now - max(age, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return now


PROCESS_START = _process_start()


class Timing:
    """One run's clock, started at its first work (a command's, or `train.fit`'s when called directly)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.first_step: float | None = None
        self.compiled_before: CompileStats = compile_stats()  # what earlier work in this process compiled

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the block's wall time to phase `name` (one of PHASES, e.g. "data_s")."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def first_step_done(self) -> None:
        if self.first_step is None:
            self.first_step = time.perf_counter()

    def record(self) -> dict[str, Any]:
        """The `timing` object (seconds unless named), for metrics.json."""
        compiled = compile_stats().since(self.compiled_before)
        now = time.perf_counter()
        return {
            "startup_s": self.started - PROCESS_START,
            **{name: self.seconds[name] for name in ("data_s", "model_s")},
            "compile_s": compiled.seconds,
            "compiles": compiled.compiles,
            "compile_cache_hits": compiled.cache_hits,
            **{name: self.seconds[name] for name in ("trunk_s", "train_s", "eval_s", "outputs_s")},
            "first_step_s": None if self.first_step is None else self.first_step - PROCESS_START,
            "total_s": now - PROCESS_START,
        }


def run_info() -> dict[str, Any]:
    """Where and when a run happened (stored with its metrics)."""
    devices = jax.devices()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": devices[0].device_kind if devices else "unknown",
        "python": platform.python_version(),
    }
