"""What a resume checks before it continues: the same model (the content of --model's file,
not its path), the same data in every split, checkpoints that verify (a corrupt one is
skipped, saying so; with none, one line and exit 2); and how a run ends when its disk fills
during a background checkpoint save, or when it has no checkpoint to resume from.

A tiny random-init classifier through the CLI in subprocesses, stopped by SIGKILL right after
a chosen checkpoint (deterministic: the run kills itself once that checkpoint is complete).
Paths are relative to the run's folder, so that each test resumes its own copy.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxft
from jaxft.checkpoint import complete_steps

TINY = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}
WORDS = "win cash now free call prize hello see you soon lunch later meeting tonight thanks".split()

# the run kills itself (SIGKILL) once the checkpoint of step KILL_AFTER or later is complete
KILLER = """
import os, signal, sys
import jaxft.checkpoint as checkpoint
save, after = checkpoint.Checkpointer.save, int(sys.argv[1])
def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step >= after:
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save_then_die
from jaxft.cli import main
sys.exit(main(sys.argv[2:]))
"""
RUNNER = "import sys; from jaxft.cli import main; sys.exit(main(sys.argv[1:]))"

# 12 steps an epoch, 24 in all; a checkpoint every 3
ARGS = ["finetune-classifier", "--init", "random", "--model", "hparams.json", "--out", "run", "--train", "train.csv",
        "--validation", "validation.csv", "--test", "test.csv", "--epochs", "2", "--batch-size", "16", "--max-length", "12",
        "--eval-freq", "4", "--eval-iter", "1", "--trainable", "all", "--lr", "1e-3", "--checkpoint-every", "3", "--no-progress"]


def _csv(rows: int, seed: int) -> str:
    rs = np.random.RandomState(seed)
    lines = ["Label,Text"]
    for i in range(rows):
        lines.append(f"{'spam' if i % 2 else 'ham'},{' '.join(rs.choice(WORDS, 1 + i % 7))}")
    return "\n".join(lines) + "\n"


def _run(where: Path, *args: str, kill_after: int | None = None, runner: str = RUNNER, runner_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-c", KILLER, str(kill_after)] if kill_after is not None else [sys.executable, "-c", runner, *runner_args]
    return subprocess.run([*prefix, *ARGS, *args], cwd=where, capture_output=True, text=True, timeout=600)


def _inputs(where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "hparams.json").write_text(json.dumps(TINY))
    for name, rows, seed in (("train", 192, 0), ("validation", 32, 1), ("test", 32, 2)):
        (where / f"{name}.csv").write_text(_csv(rows, seed))
    return where


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    where = _inputs(tmp_path_factory.mktemp("whole"))
    result = _run(where)
    assert result.returncode == 0, result.stderr[-3000:]
    return where


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run killed after its step-9 checkpoint: steps 6 and 9 kept."""
    where = _inputs(tmp_path_factory.mktemp("stopped"))
    result = _run(where, kill_after=9)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert complete_steps(where / "run" / "checkpoints") == [6, 9]
    return where


@pytest.fixture
def copy(stopped, tmp_path) -> Path:
    shutil.copytree(stopped, tmp_path / "copy")
    return tmp_path / "copy"


def _line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _params(out: Path) -> list[bytes]:
    _, params = jaxft.load(out / "model")
    return [np.asarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(params)]


def test_an_edited_hparams_json_is_refused_naming_the_field(copy):
    (copy / "hparams.json").write_text(json.dumps({**TINY, "n_head": 2}))  # the same shapes: the arrays would restore
    result = _run(copy, "--resume")
    assert result.returncode == 2
    line = _line(result)
    assert "cannot resume from" in line and "the model's n_heads is 2, the checkpoint's 4" in line, line
    assert complete_steps(copy / "run" / "checkpoints") == [6, 9]


def test_an_edited_config_json_of_model_weights_is_refused_naming_the_field(tmp_path):
    where = _inputs(tmp_path)
    config = jaxft.GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2)
    jaxft.export(config, jaxft.init_params(config, jax.random.PRNGKey(1)), where / "weights", "jaxft")
    pretrained = ["--init", "pretrained", "--model", "weights", "--trainable", "last-block"]
    assert _run(where, *pretrained, kill_after=3).returncode == -signal.SIGKILL
    saved = json.loads((where / "weights" / "config.json").read_text())
    saved["config"]["n_heads"] = 2
    (where / "weights" / "config.json").write_text(json.dumps(saved))
    result = _run(where, *pretrained, "--resume")
    assert result.returncode == 2
    assert "the model's n_heads is 2, the checkpoint's 4" in _line(result)


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_edited_data_of_any_split_is_refused_naming_the_file(split, copy):
    path = copy / f"{split}.csv"
    path.write_text(path.read_text().replace("ham,", "spam,", 1))
    result = _run(copy, "--resume")
    assert result.returncode == 2
    line = _line(result)
    assert f"the {split} data (--{split} {split}.csv) differs from the checkpoint's" in line, line


@pytest.mark.parametrize("how", ["flipped-bytes", "missing-file", "truncated-file", "garbage-record"])
def test_a_corrupt_newest_checkpoint_is_skipped_and_the_run_ends_as_the_uninterrupted(how, copy, whole):
    from test_checkpoint import CORRUPTIONS

    checkpoints = copy / "run" / "checkpoints"
    CORRUPTIONS[how](checkpoints / "9")
    result = _run(copy, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    warning = next(line for line in result.stdout.splitlines() if line.startswith("warning:"))
    assert warning.startswith(f"warning: the checkpoint of step 9 in {checkpoints.resolve()} is corrupt: ") and warning.endswith("; skipped")
    assert "note: resuming from step 6, the newest checkpoint that verifies (skipped: step 9)" in result.stdout
    assert _params(copy / "run") == _params(whole / "run")  # bitwise: step 9's changed bits never reached the weights
    assert json.loads((copy / "run" / "run.json").read_text())["status"] == "completed"


def test_no_checkpoint_that_verifies_is_one_line_exit_2(copy):
    from test_checkpoint import CORRUPTIONS

    checkpoints = copy / "run" / "checkpoints"
    CORRUPTIONS["flipped-bytes"](checkpoints / "9")
    CORRUPTIONS["garbage-record"](checkpoints / "6")
    result = _run(copy, "--resume")
    assert result.returncode == 2
    line = _line(result)
    assert f"cannot resume: no checkpoint in {checkpoints.resolve()} verifies (step 9: its arrays differ" in line and "step 6: " in line, line
    assert "--overwrite" in line
    assert complete_steps(checkpoints) == [6, 9]  # nothing deleted


def test_resume_without_checkpoints_says_it_starts_from_step_0(copy, whole):
    shutil.rmtree(copy / "run" / "checkpoints")
    result = _run(copy, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds no checkpoint to resume from: the run starts over from step 0" in result.stdout
    assert "resuming from step" not in result.stdout
    assert _params(copy / "run") == _params(whole / "run")


# The disk fills while orbax writes step 12 in its background thread; while the partial
# checkpoint takes the space, run.json cannot be written either.
DISK_FULL = """
import errno, sys
from pathlib import Path
from orbax.checkpoint._src.path import atomicity
import jaxft.rundir as rundir
finalize, write_json = atomicity.AtomicRenameTemporaryPath.finalize, rundir.write_json
async def fill(self, *args, **kwargs):
    if Path(str(self.get())).name.startswith("12."):
        raise OSError(errno.ENOSPC, "No space left on device")
    return await finalize(self, *args, **kwargs)
def full_while_partial(path, *args, **kwargs):
    if list(Path("run/checkpoints").glob("*.orbax-checkpoint-tmp*")):
        raise OSError(errno.ENOSPC, "No space left on device")
    return write_json(path, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize, rundir.write_json = fill, full_while_partial
from jaxft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_disk_full_during_a_background_save_is_one_line_failed_exit_1(tmp_path):
    where = _inputs(tmp_path)
    result = _run(where, runner=DISK_FULL)
    assert result.returncode == 1
    line = _line(result)
    assert line.endswith(f"{(where / 'run' / 'checkpoints').resolve()}: cannot write: No space left on device"), line
    record = json.loads((where / "run" / "run.json").read_text())
    assert record["status"] == "failed" and "No space left on device" in record["reason"]
    assert complete_steps(where / "run" / "checkpoints") == [6, 9]  # the previous checkpoints stay
    assert not (where / "run" / "metrics.json").exists()


def test_a_nan_stop_names_the_newest_checkpoint_with_finite_values(tmp_path):
    """lr 1e39 makes step 1's update infinite (its loss, computed before the update, is finite):
    the step-1 checkpoint holds inf weights, so the last good one is step 0's."""
    where = _inputs(tmp_path)
    result = _run(where, "--lr", "1e39", "--checkpoint-every", "1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith("non-finite training loss (nan) at step 2; last good checkpoint at step 0")
