"""Runs that survive: a fine-tuning run killed at any moment (SIGKILL) and resumed ends with
the uninterrupted run's parameters, bit for bit, and its metrics; SIGTERM checkpoints and
exits 143; resuming with other settings, reusing a directory and impossible settings are
refused in one line.

Tiny random-init models through the CLI in subprocesses (a kill needs a real process).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxft

TINY = {"n_vocab": 50257, "n_ctx": 128, "n_embd": 32, "n_head": 4, "n_layer": 2}
TIMING = {"train_seconds", "total_seconds", "response_seconds", "run", "outputs", "timing"}
# how many shapes this process compiled: a resumed process compiles only the shapes it meets
PER_PROCESS = {"train_step_compilations", "eval_step_compilations", "generate_compilations"}

RUNNER = "import sys; from jaxft.cli import main; sys.exit(main(sys.argv[1:]))"

COMMANDS = {
    # each step evaluates (--eval-freq 1) so that training lasts long enough to be killed mid-way;
    # both cross an epoch boundary (classifier: 8 steps per epoch; instruct: 12)
    "finetune-classifier": ["--epochs", "2", "--batch-size", "128", "--max-length", "16", "--eval-freq", "1", "--eval-iter", "2",
                            "--trainable", "all", "--drop-rate", "0.1", "--lr", "1e-3"],
    "finetune-instruct": ["--epochs", "2", "--max-steps", "16", "--limit", "60", "--batch-size", "4", "--eval-freq", "1",
                          "--eval-iter", "2", "--allowed-max-length", "64", "--bucket-multiple", "64", "--no-responses", "--lr", "1e-3"],
}


@pytest.fixture(scope="module")
def hparams(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "hparams.json"
    path.write_text(json.dumps(TINY))
    return path


def _argv(command: str, hparams: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", RUNNER, command, "--init", "random", "--model", str(hparams), "--out", str(out),
            *COMMANDS[command], *extra]


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _complete_steps(out: Path) -> list[int]:
    from jaxft.checkpoint import complete_steps

    return complete_steps(out / "checkpoints")


def _kill_after_checkpoint(argv: list[str], out: Path, at_least: int) -> None:
    """Start the run, SIGKILL it as soon as a checkpoint of step >= at_least is complete."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            steps = _complete_steps(out)
            if steps and steps[-1] >= at_least:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before a checkpoint of step {at_least}: {proc.stderr.read()[-2000:]}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists(), "killed too late: the run had completed"


def _params(out: Path) -> list[np.ndarray]:
    _, params = jaxft.load(out / "model")
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(params)]


def _comparable(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["recipe"]["trainer"].pop("attention")  # may change on resume (rundir.RESUMABLE_DIFFERENTLY); checked apart
    metrics["recipe"]["trainer"].pop("checkpoint_every")  # bookkeeping: the same training every N steps
    return {k: v for k, v in metrics.items() if k not in TIMING | PER_PROCESS}


def _assert_same_run(expected: Path, got: Path) -> None:
    a, b = _params(expected), _params(got)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bitwise
    assert _comparable(got) == _comparable(expected)


@pytest.fixture(scope="module")
def uninterrupted(hparams, tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for command in COMMANDS:
        out = tmp_path_factory.mktemp("whole") / "run"
        result = _run(_argv(command, hparams, out, "--checkpoint-every", "3"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((out / "run.json").read_text())["status"] == "completed"
        runs[command] = out
    return runs


@pytest.mark.parametrize("command", list(COMMANDS))
def test_killed_twice_and_resumed_equals_uninterrupted(command, hparams, uninterrupted, tmp_path):
    out = tmp_path / "run"
    argv = _argv(command, hparams, out, "--checkpoint-every", "3")
    _kill_after_checkpoint(argv, out, at_least=3)  # early: resumes mid-epoch
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # died without a word
    first = _complete_steps(out)[-1]
    refused = _run(argv)  # without --resume: says how to resume
    assert refused.returncode == 2 and "--resume" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    _kill_after_checkpoint([*argv, "--resume"], out, at_least=first + 6)  # a second point, after a resume
    # how attention is computed may change on resume (a run begun with cuDNN's kernel goes on on a
    # CPU); on a CPU "auto" is this explicit path, so the run stays bitwise the uninterrupted one
    result = _run([*argv, "--resume", "--attention", "xla"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step" in result.stdout
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed" and len(record["attempts"]) == 3
    assert json.loads((out / "metrics.json").read_text())["recipe"]["trainer"]["attention"] == "xla"  # the last attempt's
    _assert_same_run(uninterrupted[command], out)


def test_sigterm_checkpoints_and_exits_143_then_resumes(hparams, uninterrupted, tmp_path):
    command = "finetune-classifier"
    out = tmp_path / "run"
    argv = _argv(command, hparams, out, "--checkpoint-every", "3")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not _complete_steps(out) or _complete_steps(out)[-1] < 4:  # step 0 is written before training
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert "interrupted at step" in line and "checkpoint written" in line and "--resume" in line, line
    step = int(line.split("interrupted at step ")[1].split()[0])
    assert _complete_steps(out)[-1] == step  # the checkpoint of the step it stopped at
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["reason"]
    result = _run([*argv, "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(uninterrupted[command], out)


# SIGTERM sent by the run to itself at a phase outside the steps: during the last epoch's end
# (its evaluations; the graceful handler is installed) or while writing the outputs (it is not).
SIGTERM_AT = """
import os, signal, sys
import jaxft.train as train
if sys.argv[1] == "last-epoch-end":
    class Progress(train.Progress):
        def close(self):
            super().close()
            if self.desc == "epoch 2/2":
                os.kill(os.getpid(), signal.SIGTERM)
    train.Progress = Progress
else:
    plot = train.plot_values
    def plot_values(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return plot(*args, **kwargs)
    train.plot_values = plot_values
from jaxft.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("phase, every", [("last-epoch-end", "3"), ("outputs", "3"), ("outputs", "4")])
def test_sigterm_outside_the_steps_is_recorded_and_resumes(phase, every, hparams, uninterrupted, tmp_path):
    command = "finetune-classifier"
    out = tmp_path / "run"
    argv = _argv(command, hparams, out, "--checkpoint-every", every)
    result = _run([argv[0], "-c", SIGTERM_AT, phase, *argv[3:]])
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 143, result.stderr[-2000:]
    assert "--resume" in line and ("interrupted at step 16 (SIGTERM)" if phase == "last-epoch-end" else "interrupted (SIGTERM)") in line, line
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["reason"]
    assert not (out / "metrics.json").exists()
    # the stop (last-epoch-end), or the end of training (outputs), wrote the last step's checkpoint
    # after the last epoch's end: with --checkpoint-every 3 (16 is no multiple) the resume does not
    # train steps 16 again, with 4 (the step-16 checkpoint came before that epoch's end) it does not
    # evaluate that epoch again
    assert _complete_steps(out)[-1] == 16
    result = _run([*argv, "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 16 (epoch 3, batch 0)" in result.stdout
    _assert_same_run(uninterrupted[command], out)


def test_other_settings_and_used_directories_refused_overwrite_starts_over(hparams, uninterrupted, tmp_path):
    command = "finetune-classifier"
    done = uninterrupted[command]
    before = (done / "metrics.json").read_bytes()
    result = _run(_argv(command, hparams, done, "--checkpoint-every", "3"))  # a completed run's directory
    assert result.returncode == 2 and "--overwrite" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (done / "metrics.json").read_bytes() == before

    out = tmp_path / "run"
    argv = _argv(command, hparams, out, "--checkpoint-every", "3")
    _kill_after_checkpoint(argv, out, at_least=3)
    result = _run([*argv, "--lr", "2e-3", "--resume"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "lr differs" in lines[0], result.stderr
    result = _run([*argv, "--overwrite"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads((out / "run.json").read_text())["attempts"]) == 1  # a new run
    _assert_same_run(done, out)


def test_other_frozen_weights_at_the_same_model_path_are_refused(hparams, tmp_path):
    """The frozen parameters are not in the checkpoint (they come from --model again): a resume
    from other weights at the same path would mix two models without a word."""
    config = jaxft.GPTConfig(**{"vocab_size": 50257, "context_length": 128, "emb_dim": 32, "n_heads": 4, "n_layers": 2})
    weights = tmp_path / "weights"
    jaxft.export(config, jaxft.init_params(config, jax.random.PRNGKey(1)), weights, "jaxft")
    out = tmp_path / "run"
    argv = [*_argv("finetune-classifier", hparams, out, "--checkpoint-every", "3", "--trainable", "last-block")]
    argv[argv.index("--model") + 1], argv[argv.index("--init") + 1] = str(weights), "pretrained"
    _kill_after_checkpoint(argv, out, at_least=3)
    original = tmp_path / "original"
    weights.rename(original)
    jaxft.export(config, jaxft.init_params(config, jax.random.PRNGKey(2)), weights, "jaxft")
    result = _run([*argv, "--resume"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "the frozen parameters differ from the run's" in lines[-1], result.stderr[-2000:]
    shutil.rmtree(weights)
    original.rename(weights)
    result = _run([*argv, "--resume"])
    assert result.returncode == 0 and "resuming from step" in result.stdout, result.stderr[-2000:]


def test_resuming_on_other_devices_says_it_is_not_bitwise(hparams, tmp_path, monkeypatch):
    """A run begun on 2 devices (the default mesh spans them) may go on on 1, with a note: the
    same computation, summed in another order."""
    out = tmp_path / "run"
    argv = _argv("finetune-classifier", hparams, out, "--checkpoint-every", "3")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    _kill_after_checkpoint(argv, out, at_least=3)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    result = _run([*argv, "--resume"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: resuming on 1 device where the checkpoint was written on mesh data=2,fsdp=1" in result.stdout


@pytest.mark.parametrize("flags, message", [(["--lr", "inf"], "lr must be finite"), (["--weight-decay", "-5"], "weight-decay must be")])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_impossible_settings_refused_up_front(command, flags, message, hparams, tmp_path):
    out = tmp_path / "run"
    result = _run(_argv(command, hparams, out, *flags))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not out.exists()



SIGTERM_WHILE_COMPILING = """
import os, signal, sys, threading
import jaxft.model as model, jaxft.recipes.common as common
original, delay = model.init_params, float(sys.argv[1])
def init_params(*args, **kwargs):  # the signal lands while XLA compiles the initialisation
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
    return original(*args, **kwargs)
model.init_params = common.init_params = init_params
sys.argv = sys.argv[1:]
from jaxft.cli import main
sys.exit(main())  # as the `jaxft` command (it reads sys.argv)
"""


def test_a_signal_during_start_up_exits_143_not_a_crash(hparams, tmp_path):
    """SIGTERM while XLA compiles (on other threads) used to end in a segfault at interpreter exit
    (139; here with delays of 0.2 and 0.4 s, not 0.05 or 0.8). As the `jaxft` command, a stopped
    run now leaves the process at once. A busy machine once saw exit 0: the handler's exception had
    landed inside XLA's garbage-collection callback, which drops it; the handler now only records
    the signal, and wherever it lands (start-up on most machines, the first steps on a fast one)
    the run stops at its next safe point."""
    for delay in ("0.2", "0.4"):
        argv = [sys.executable, "-c", SIGTERM_WHILE_COMPILING, delay, "finetune-classifier", "--init", "random", "--model", str(hparams),
                "--out", str(tmp_path / delay), *COMMANDS["finetune-classifier"], "--compile-cache", "off", "--no-progress"]
        result = _run(argv, timeout=120)
        assert result.returncode == 143, result.stderr[-2000:]
        assert "Exception ignored" not in result.stderr, result.stderr[-2000:]
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("jaxft finetune-classifier: interrupted") and "(SIGTERM)" in line, line
        if (tmp_path / delay).exists():  # --out was taken before the signal
            assert json.loads((tmp_path / delay / "run.json").read_text())["status"] == "interrupted"
