"""jaxft.interrupts: real signals set a flag; Ctrl-C twice raises; handlers come back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from jaxft.interrupts import catch_signals, exit_code, signal_name

REPO = Path(__file__).resolve().parents[1]


def send(signum: int, stop=None) -> None:
    """Signal this process; with `stop`, wait until its handler has run (with other threads
    about, the kernel may deliver the signal to one of them, and the main thread runs the
    Python handler a moment later)."""
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5
    while stop is not None and not stop and time.monotonic() < deadline:
        time.sleep(0.001)


def test_sigterm_sets_the_flag_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    seen = []
    with catch_signals(on_signal=seen.append) as stop:
        assert stop.active and stop.requested is None and not stop
        send(signal.SIGTERM, stop)
        assert stop.requested == signal.SIGTERM and stop.name == "SIGTERM"
        send(signal.SIGTERM)  # a second SIGTERM changes nothing
        time.sleep(0.01)
        assert stop.requested == signal.SIGTERM
    assert seen[0] == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before


def test_second_sigint_raises_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt):
        with catch_signals() as stop:
            send(signal.SIGINT, stop)
            assert stop.requested == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted by the handler
            pytest.fail("the second SIGINT did not interrupt")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_after_sigterm_is_the_escape_hatch():
    with pytest.raises(KeyboardInterrupt):
        with catch_signals() as stop:
            send(signal.SIGTERM, stop)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert stop.requested == signal.SIGTERM


def test_previous_custom_handler_is_restored():
    calls = []
    old = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    try:
        with catch_signals() as stop:
            send(signal.SIGTERM, stop)
        assert calls == []
        send(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.001)
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_outside_the_main_thread_nothing_is_installed():
    result = {}

    def worker():
        with catch_signals() as stop:
            result["active"] = stop.active
            result["handler"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert result == {"active": False, "handler": before}


def test_exit_codes():
    assert exit_code(signal.SIGINT) == 130
    assert exit_code(signal.SIGTERM) == 143
    assert exit_code(None) == 0
    assert signal_name(signal.SIGINT) == "SIGINT" and signal_name(999) == "signal 999"


LOOP = textwrap.dedent(
    """
    import sys, time
    from jaxft.interrupts import catch_signals, exit_code
    with catch_signals() as stop:
        print("ready", flush=True)
        steps = 0
        while not stop:
            time.sleep(0.01)  # a training step
            steps += 1
        print("finished the step, checkpointing", flush=True)
    sys.exit(exit_code(stop.requested))
    """
)


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_run_stops_gracefully_with_the_shell_exit_code(signum, code):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", LOOP], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == code
        assert proc.stdout.read() == "finished the step, checkpointing\n"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
