"""jaxft.interrupts: real signals set a flag; Ctrl-C twice raises; handlers come back."""

from __future__ import annotations

import gc
import json
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


# --------------------------------------------------------------------------- SIGTERM through a whole run

# The moments of a tiny fine-tuning run (in order): just before each of these is called, the
# run sends itself SIGTERM. Counted calls, not delays: the same moments on a fast or busy machine.
MOMENTS = [
    ("jaxft.recipes.classify", "resolve_model"),  # loading (before --out is taken)
    ("jaxft.recipes.classify.ClassificationTask", "step_options"),  # the trunk cache
    ("jaxft.train", "make_steps"),
    ("jaxft.resume.Checkpoints", "save"),  # step 0's (after the initial evaluation), then in the loop
    ("jaxft.steps", "host_values"),  # each evaluation batch: initial, periodic, epoch end, final
    ("jaxft.train", "host_values"),  # each training step
    ("jaxft.distributed", "gather"),
    ("jaxft.train", "plot_values"),
    ("jaxft.train", "save_model_dir"),
    ("jaxft.recipes.classify.ClassificationTask", "outputs"),
    ("jaxft.train", "write_json"),  # metrics.json, the run's last write
]


def _owner(path: str):
    import importlib

    module, _, attr = path.rpartition(".")
    try:
        return importlib.import_module(path)
    except ImportError:
        return getattr(importlib.import_module(module), attr)


def signal_inside_gc(signum: int) -> None:
    """Deliver `signum` so that its Python handler runs inside a garbage-collection callback, as
    XLA's are: where an exception raised by the handler is dropped ("Exception ignored in ...")."""

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            gc.callbacks.remove(callback)
            signal.pthread_kill(threading.main_thread().ident, signum)  # the main thread runs the handler ...
            for _ in range(1000):
                pass  # ... here, at its next check between bytecodes

    gc.callbacks.append(callback)
    gc.collect()


def _arm(monkeypatch, at: int | None) -> list[str]:
    """Wrap MOMENTS; the call numbered `at` (from 0, over all of them) first sends SIGTERM inside
    a garbage-collection callback. Returns the moments met, in order."""
    met: list[str] = []
    for path, name in MOMENTS:
        owner = _owner(path)
        original = getattr(owner, name)

        def wrapper(*args, _original=original, _what=f"{path}.{name}", **kwargs):
            if len(met) == at:
                signal_inside_gc(signal.SIGTERM)
            met.append(_what)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
    return met


def _tiny_run(tmp_path: Path) -> list[str]:
    data = tmp_path / "data.csv"
    if not data.exists():
        data.write_text("Label,Text\n" + "ham,hello there\nspam,win money now\n" * 12)  # 3 batches of 8 a split
        (tmp_path / "hparams.json").write_text('{"n_vocab": 50257, "n_ctx": 32, "n_embd": 16, "n_head": 2, "n_layer": 2}')
    return ["finetune-classifier", "--init", "random", "--model", str(tmp_path / "hparams.json"), "--train", str(data),
            "--validation", str(data), "--test", str(data), "--max-length", "8", "--batch-size", "8", "--epochs", "1",
            "--eval-iter", "1", "--no-progress"]


@pytest.fixture(scope="module")
def timeline(tmp_path_factory) -> list[str]:
    """The moments of the uninterrupted run."""
    from jaxft.cli import main

    tmp = tmp_path_factory.mktemp("timeline")
    with pytest.MonkeyPatch.context() as monkeypatch:
        met = _arm(monkeypatch, None)
        assert main([*_tiny_run(tmp), "--out", str(tmp / "out")]) == 0
    assert met[0].endswith("resolve_model") and met[-1].endswith("write_json")
    return met


@pytest.mark.parametrize("k", range(20))
def test_sigterm_at_any_moment_of_a_run_exits_143_and_is_recorded(k, timeline, tmp_path, monkeypatch, capsys):
    """Twenty moments spread from loading to metrics.json, each signal landing inside a garbage-
    collection callback (where a handler's exception used to be dropped and the run went on to exit
    0): the handler only records it and the run stops at its next safe point, exit 143 every time,
    run.json "interrupted" once --out is taken."""
    from jaxft.cli import main

    at = round(k * (len(timeline) - 1) / 19)
    out = tmp_path / "out"
    met = _arm(monkeypatch, at)
    code = main([*_tiny_run(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert len(met) > at, "the moment never came"
    assert code == 143, (timeline[at], err[-2000:])
    assert "Exception ignored" not in err and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("jaxft finetune-classifier: interrupted") and "(SIGTERM)" in line, line
    if at == 0:  # while loading: nothing taken, nothing created
        assert not out.exists()
    else:
        record = json.loads((out / "run.json").read_text())
        assert record["status"] == "interrupted" and "SIGTERM" in record["reason"], (timeline[at], record)


def test_deferred_signals_are_only_recorded_and_stop_at_a_safe_point():
    from jaxft import interrupts

    with interrupts.defer_signals():
        interrupts.check()  # nothing caught: nothing happens
        signal_inside_gc(signal.SIGTERM)  # no exception to drop: the handler only records
        assert interrupts.requested() == signal.SIGTERM
        with catch_signals() as stop:  # a loop started after the signal stops at its first step
            assert stop.requested == signal.SIGTERM
            interrupts.check()  # the loop stops on its own: no exception inside it
        with pytest.raises(interrupts.Terminated) as excinfo:
            interrupts.check()
        assert excinfo.value.signum == signal.SIGTERM
    assert interrupts.requested() is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_caught_by_a_loop_under_defer_signals_stops_the_code_after_it():
    from jaxft import interrupts

    with interrupts.defer_signals():
        with catch_signals() as stop:
            send(signal.SIGINT, stop)
        with pytest.raises(interrupts.Terminated) as excinfo:
            interrupts.check()
        assert excinfo.value.signum == signal.SIGINT and exit_code(excinfo.value.signum) == 130


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception, on purpose
def test_a_raised_signal_dropped_by_the_garbage_collector_is_still_recorded():
    """terminate_raises (commands without safe points): the handler's exception raised inside a gc
    callback is lost, but the record is not, and the command's last check raises it."""
    from jaxft import interrupts

    with interrupts.terminate_raises():
        signal_inside_gc(signal.SIGTERM)
        assert interrupts.requested() == signal.SIGTERM
        with pytest.raises(interrupts.Terminated):
            interrupts.check()
