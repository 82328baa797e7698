"""Graceful SIGINT / SIGTERM: a run is asked to stop, finishes its step, checkpoints and
records why it stopped, instead of dying mid-write.

    with catch_signals() as stop:
        for batch in batches:
            state = train_step(state, batch)
            if stop.requested:
                break  # save a checkpoint, mark the run "interrupted"
    ...
    return exit_code(stop.requested)   # 130 for SIGINT, 143 for SIGTERM

A second SIGINT (Ctrl-C again) while a stop is pending raises KeyboardInterrupt: the
escape hatch when the graceful path hangs. Outside such a block (loading, the trunk cache,
the initial evaluation, the outputs), `terminate_raises` makes SIGTERM stop the command the way
Ctrl-C does, with an exception, so that the run's record says why it ended.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """What `catch_signals` yields: `requested` is the first caught signal's number (None
    while no signal came); `active` says whether handlers were installed (main thread)."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.requested: int | None = None

    def __bool__(self) -> bool:
        return self.requested is not None

    @property
    def name(self) -> str | None:
        """"SIGINT" / "SIGTERM" (for run.json's reason), or None."""
        return signal_name(self.requested) if self.requested is not None else None


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a `catch_signals` block (under `terminate_raises`): handled wherever
    Ctrl-C's KeyboardInterrupt is, with `signum` for the exit status (143)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` instead of killing the process silently
    (its default), so `finally` blocks run and run.json records the interruption. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int | None) -> int:
    """The shell's exit status for a run stopped by `signum`: 128 + signum (130 for SIGINT,
    143 for SIGTERM); 0 when no signal stopped it."""
    return 0 if signum is None else 128 + int(signum)


@contextlib.contextmanager
def catch_signals(
    signals: tuple[int, ...] = SIGNALS, on_signal: Callable[[int], None] | None = None
) -> Iterator[StopRequest]:
    """Within the block, `signals` set `.requested` instead of killing or raising;
    `on_signal(signum)` (e.g. printing "stopping after this step") runs at each one.
    The previous handlers come back on exit. Outside the main thread, where Python cannot
    install handlers, nothing is installed and `.requested` stays None."""
    if threading.current_thread() is not threading.main_thread():
        yield StopRequest(active=False)
        return
    stop = StopRequest(active=True)

    def handler(signum: int, frame: object) -> None:
        if stop.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if stop.requested is None:
            stop.requested = signum
        if on_signal is not None:
            on_signal(signum)

    previous = {signum: signal.getsignal(signum) for signum in signals}
    try:
        for signum in signals:
            signal.signal(signum, handler)
        yield stop
    finally:
        for signum, old in previous.items():
            # getsignal gives None for a handler not installed from Python; SIG_DFL is the
            # closest we can restore
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
