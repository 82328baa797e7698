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
escape hatch when the graceful path hangs.

Outside such a block a command picks one of two ways:
  * `defer_signals` (the fine-tuning commands): the handler only records the signal and the
    command calls `check()` at safe points (start-up, each evaluation batch, each output),
    which raises `Terminated`. A handler never raises there: an exception raised from a
    handler can land inside a garbage-collection callback (XLA's among them), where Python
    prints "Exception ignored" and drops it, and the signal is lost. A stop waits for the
    next safe point: after a weight load, an XLA compilation or the trunk cache, not during.
  * `terminate_raises` (commands without safe points): SIGTERM raises `Terminated` as Ctrl-C
    raises KeyboardInterrupt; the signal is recorded too, so one whose exception was dropped
    still ends the command with its exit status (`check()` after the work).
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
    """SIGTERM (or a deferred SIGINT) outside a `catch_signals` block: handled wherever Ctrl-C's
    KeyboardInterrupt is, with `signum` for the exit status (143, 130)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


class _Record:
    """The signal caught under `defer_signals` / `terminate_raises` (None: none), and whether a
    `catch_signals` loop is running (it stops on its own: `check` leaves it alone)."""

    pending: int | None = None
    owner: bool = False  # a command's handler is installed (a record is kept)
    loops: int = 0


def requested() -> int | None:
    """The first SIGINT/SIGTERM caught under `defer_signals` or `terminate_raises`, or None."""
    return _Record.pending


def check() -> None:
    """A safe point: raise `Terminated` if a signal was caught (the command stops here; its
    `finally` blocks and run.json's record run as for Ctrl-C). Inside a `catch_signals` block
    nothing happens: the loop checkpoints and stops after its step."""
    if _Record.pending is not None and not _Record.loops:
        raise Terminated(_Record.pending)


def _record(signum: int) -> None:
    if _Record.pending is None:
        _Record.pending = signum


@contextlib.contextmanager
def _owned(handler: Callable[[int, object], None]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    saved = (_Record.pending, _Record.owner)
    _Record.pending, _Record.owner = None, True
    try:
        for signum in SIGNALS:
            signal.signal(signum, handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
        _Record.pending, _Record.owner = saved


@contextlib.contextmanager
def defer_signals() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM are only recorded (`requested`); `check()` at the
    code's safe points raises `Terminated`. A SIGINT after a recorded signal raises
    KeyboardInterrupt at once (the escape hatch). Main thread only; the handlers and the
    record come back on exit."""

    def handler(signum: int, frame: object) -> None:
        if _Record.pending is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        _record(signum)

    with _owned(handler):
        yield


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` instead of killing the process silently
    (its default), so `finally` blocks run and run.json records the interruption; SIGINT raises
    KeyboardInterrupt as usual. Both are recorded (`requested`, `check`): Python drops an
    exception raised inside a garbage-collection callback. Main thread only."""

    def handler(signum: int, frame: object) -> None:
        _record(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    with _owned(handler):
        yield


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
    install handlers, nothing is installed and `.requested` stays None. Under `defer_signals`
    a signal recorded before the block is `.requested` from the start, and one caught in the
    block stays recorded after it (the code after the loop stops at its next `check`)."""
    if threading.current_thread() is not threading.main_thread():
        yield StopRequest(active=False)
        return
    stop = StopRequest(active=True)
    stop.requested = _Record.pending

    def handler(signum: int, frame: object) -> None:
        if stop.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if stop.requested is None:
            stop.requested = signum
        if _Record.owner:
            _record(signum)
        if on_signal is not None:
            on_signal(signum)

    previous = {signum: signal.getsignal(signum) for signum in signals}
    _Record.loops += 1
    try:
        for signum in signals:
            signal.signal(signum, handler)
        yield stop
    finally:
        _Record.loops -= 1
        for signum, old in previous.items():
            # getsignal gives None for a handler not installed from Python; SIG_DFL is the
            # closest we can restore
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
