"""Many hosts: start JAX's distributed runtime, check the processes agree, gather results.

Every process runs the same program; `initialize` must come before anything else touches
JAX (no array, no `jax.devices()`). Afterwards `jax.devices()` lists every process's
devices and jaxft.sharding's mesh spans them all. CPU processes talk through gloo.

    initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # on host 0
    initialize("10.0.0.1:1234", num_processes=2, process_id=1)   # on host 1
    initialize()          # SLURM, Open MPI, Kubernetes, Cloud TPU: JAX reads the environment

JAX itself aborts the whole process (a C++ fatal error and a stack trace) when the
coordinator stays out of reach past its timeout. `initialize` turns that into one line:
a process other than 0 first waits for the coordinator's port to accept connections and
raises DistributedError when it does not; a watchdog covers the rest of the rendezvous
(process 0 waiting for peers that never come), printing one line to stderr and exiting
the process with status 1 at the timeout.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np


class DistributedError(RuntimeError):
    """The processes could not start or do not agree; the message is one line."""


def _host_port(coordinator: str) -> tuple[str, int]:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator {coordinator!r} must be host:port (port 1 to 65535), e.g. 10.0.0.1:1234")
    return host.strip("[]"), int(port)


def _wait_for_port(host: str, port: int, deadline: float) -> bool:
    """True once something accepts TCP connections at host:port, False at the deadline."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            with socket.create_connection((host, port), timeout=min(1.0, remaining)):
                return True
        except OSError:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _exit_with(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    os._exit(1)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: float = 60,
) -> None:
    """jax.distributed.initialize with a bounded, one-line failure.

    coordinator: "host:port" of process 0 (which serves it). Leave any argument None to
    let JAX read it from the cluster environment (SLURM, Open MPI, ...); all None asks
    JAX to detect everything. timeout_s bounds the whole rendezvous.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout must be positive, not {timeout_s}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"the number of processes must be >= 1, not {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside 0..{num_processes - 1}")
    deadline = time.monotonic() + timeout_s
    where = coordinator or "(from the cluster environment)"
    if coordinator is not None:
        host, port = _host_port(coordinator)
        if process_id not in (None, 0) and not _wait_for_port(host, port, deadline):
            raise DistributedError(f"cannot reach the coordinator {coordinator} within {timeout_s:g} s")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    remaining = max(deadline - time.monotonic(), 1.0)
    watchdog = threading.Timer(
        remaining,
        _exit_with,
        [f"not every process reached the coordinator {where} within {timeout_s:g} s"],
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        # JAX's own deadline comes later than the watchdog, so its abort never wins.
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=math.ceil(remaining) + 30,
        )
    except (RuntimeError, ValueError, TypeError) as error:
        hint = ("; pass --coordinator HOST:PORT, or run under a cluster JAX detects (SLURM, Open MPI, ...)"
                if coordinator is None and "coordinator_address" in str(error) else "")
        raise DistributedError(f"cannot start the distributed runtime: {str(error).splitlines()[0].rstrip('.')}{hint}") from error
    finally:
        watchdog.cancel()
    if threading.current_thread() is threading.main_thread():
        # JAX's preemption notifier has taken SIGTERM over below Python: it would log the signal and
        # let the run go on to its end. Python's handler (jaxft.interrupts: stop after the step,
        # agreed over the processes) takes it back.
        signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM) or signal.SIG_DFL)


def on_main(fn: Callable[[], Any], what: str) -> Any:
    """`fn()` on process 0 alone (e.g. taking --out), every process learning whether it failed:
    the others then raise a one-line DistributedError instead of waiting for process 0 in the
    next collective. Process 0 re-raises its own error. Returns fn's result (None elsewhere)."""
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except Exception as exc:  # shared below, then raised
            error = exc
    if jax.process_count() > 1:
        failed = int(np.asarray(multihost_utils.process_allgather(np.array([error is not None], np.int32))).max())
        if failed and error is None:
            raise DistributedError(f"process 0 stopped while {what}; its error is in its own output")
    if error is not None:
        raise error
    return result


def any_process(value: int) -> int:
    """The largest `value` over the processes (a stop any process was asked for stops them all,
    at the same step). `value` itself with one process."""
    if jax.process_count() == 1:
        return value
    return int(np.asarray(multihost_utils.process_allgather(np.array([value], np.int32))).max())


def is_main_process() -> bool:
    """True on process 0: the one that logs, writes checkpoints and plots."""
    return jax.process_index() == 0


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, sort_keys=True, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_same_settings(settings: Mapping[str, Any]) -> None:
    """Raise DistributedError (one line naming the keys) unless every process passes equal settings.

    Values are compared as JSON (anything else by repr). A no-op with one process.
    """
    if jax.process_count() == 1:
        return
    blob = np.frombuffer(json.dumps(dict(settings), sort_keys=True, default=repr).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([blob.size], np.int32)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.int32)
    padded[: blob.size] = blob
    gathered = multihost_utils.process_allgather(padded)
    per_process = [
        json.loads(bytes(row[:n].astype(np.uint8)).decode()) for row, n in zip(np.asarray(gathered), lengths)
    ]
    missing = object()
    keys = sorted(set().union(*per_process))
    differing = [k for k in keys if any(p.get(k, missing) != per_process[0].get(k, missing) for p in per_process)]
    if differing:
        parts = []
        for key in differing:
            values = ", ".join(
                f"process {i}: {_short(p[key]) if key in p else 'unset'}" for i, p in enumerate(per_process)
            )
            parts.append(f"{key} ({values})")
        raise DistributedError(f"the processes disagree on settings: {'; '.join(parts)}")


def gather(tree: Any) -> Any:
    """Every array of `tree` whole, as NumPy, on every process (for checkpoints, logs and
    tests). Sharded arrays are all-gathered across processes; None leaves stay None."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree_util.tree_map(
        lambda x: multihost_utils.process_allgather(x, tiled=True) if isinstance(x, jax.Array) else x, tree
    )
