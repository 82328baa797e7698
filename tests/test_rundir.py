"""jaxft.rundir: one owner per run directory; fresh, refused, overwrite and resume rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxft import rundir
from jaxft.rundir import RunDirError, check, claim

SETTINGS = {"lr": 5e-05, "epochs": 2, "batch_size": 8, "trainable": "last-block", "shape": (1, 2), "resume": False}
REPO = Path(__file__).resolve().parents[1]


def start(out: Path, **kw) -> rundir.RunDir:
    kw = {"command": "classify", "settings": SETTINGS, **kw}
    return claim(out, **kw)


def finished_run(out: Path, status: str, checkpoint_steps=(), reason=None) -> None:
    """A run directory as a previous process left it."""
    with start(out) as run:
        (out / "metrics.json").write_text("{}")
        (out / "model").mkdir()
        (out / "model" / "params.safetensors").write_bytes(b"x")
        for step in checkpoint_steps:
            (run.checkpoints / str(step)).mkdir(parents=True)
            (run.checkpoints / str(step) / "commit_success.txt").write_text("ok")
        run.mark(status, reason)


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def refused(match: str, out: Path, **kw) -> str:
    kw = {"command": "classify", "settings": SETTINGS, **kw}
    with pytest.raises(RunDirError) as excinfo:
        check(out, **kw)
    with pytest.raises(RunDirError) as again:
        claim(out, **kw)
    message = str(excinfo.value)
    assert message == str(again.value) and "\n" not in message
    assert match in message, message
    return message


def test_fresh_run_in_a_missing_or_empty_directory(tmp_path):
    out = tmp_path / "runs" / "a"
    assert check(out, command="classify", settings=SETTINGS) == "fresh"
    assert not out.exists()  # check changes nothing
    with start(out, argv=["jaxft", "classify", "--out", str(out)]) as run:
        assert run.mode == "fresh" and run.path == out and run.latest_checkpoint() is None
        doc = record(out)
        assert doc["status"] == "running" and doc["command"] == "classify"
        assert doc["settings"] == {**SETTINGS, "shape": [1, 2]}
        assert set(doc["versions"]) >= {"jaxft", "jax", "flax", "optax", "orbax", "python"}
        assert doc["started"] and doc["updated"]
        assert doc["attempts"][0]["pid"] == os.getpid() and doc["attempts"][0]["argv"][1] == "classify"
        assert run.checkpoints == out / "checkpoints"
    (tmp_path / "empty").mkdir()
    assert check(tmp_path / "empty", command="classify", settings=SETTINGS) == "fresh"


def test_mark_statuses(tmp_path):
    with start(tmp_path / "out") as run:
        run.mark("failed", "validation loss is NaN")
        assert record(run.path)["status"] == "failed" and record(run.path)["reason"] == "validation loss is NaN"
        run.mark("completed")
        assert record(run.path)["status"] == "completed" and "reason" not in record(run.path)
        assert run.record == record(run.path)
        with pytest.raises(ValueError, match="unknown run status 'done'"):
            run.mark("done")


def test_other_files_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt"):
        (out / name).write_text("mine")
    (out / "sub").mkdir()
    message = refused("not empty", out)
    assert message == f"{out}: not empty (a.txt, b.txt, c.txt, d.txt and 2 more); choose another --out"
    # overwrite never deletes what is not a jaxft run (a mistyped --out)
    message = refused("refusing to delete them", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "sub"]
    refused("holds no run.json", out, resume=True)


def test_completed_run_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    finished_run(out, "completed")
    message = refused("holds a completed run of `classify`", out)
    assert message.endswith("(metrics.json, model/, run.json); pass --overwrite to replace it or choose another --out")
    refused("cannot resume: the run in", out, resume=True)


@pytest.mark.parametrize("status", ["interrupted", "failed", "running"])
def test_unfinished_run_says_how_to_resume(tmp_path, status):
    out = tmp_path / "out"
    finished_run(out, status, checkpoint_steps=(40, 80), reason="SIGTERM" if status == "interrupted" else None)
    (out / "checkpoints" / "120.orbax-checkpoint-tmp").mkdir()  # a save the end cut short
    message = refused("pass --resume", out)
    why = {"interrupted": ": SIGTERM", "failed": "", "running": ", its process gone"}[status]
    assert message == (
        f"{out}: holds an unfinished run of `classify` (status {status}{why}, last checkpoint at step 80); "
        "pass --resume to continue it or --overwrite to start over"
    )


def test_overwrite_clears_a_run_directory(tmp_path):
    out = tmp_path / "out"
    finished_run(out, "interrupted", checkpoint_steps=(3,))
    before = record(out)
    with start(out, overwrite=True, settings={**SETTINGS, "lr": 1.0}) as run:
        assert run.mode == "overwrite" and run.latest_checkpoint() is None
        assert sorted(p.name for p in out.iterdir()) == ["run.json"]
        assert record(out)["settings"]["lr"] == 1.0 and record(out)["started"] >= before["started"]
        assert len(record(out)["attempts"]) == 1


def test_resume_continues_an_unfinished_run(tmp_path):
    out = tmp_path / "out"
    finished_run(out, "interrupted", checkpoint_steps=(3, 6), reason="SIGINT")
    # `resume` may differ, and `attention` and `head_vocab_multiple` (missing from runs that started
    # before they existed); a tuple equals its list
    settings = {**SETTINGS, "resume": True, "attention": "cudnn", "head_vocab_multiple": 64, "shape": [1, 2]}
    assert check(out, command="classify", settings=settings, resume=True) == "resume"
    with start(out, settings=settings, resume=True) as run:
        assert run.mode == "resume" and run.latest_checkpoint() == 6
        doc = record(out)
        assert doc["status"] == "running" and "reason" not in doc and len(doc["attempts"]) == 2
        assert doc["settings"]["resume"] is False  # the run's settings are those it started with
        assert (out / "metrics.json").exists() and (out / "model" / "params.safetensors").exists()


def test_resume_with_different_settings_names_the_difference(tmp_path):
    out = tmp_path / "out"
    finished_run(out, "interrupted", checkpoint_steps=(3,))
    message = refused("cannot resume", out, resume=True, settings={**SETTINGS, "lr": 0.0001})
    assert message == "cannot resume: --lr differs (run.json 5e-05, now 0.0001)"
    message = refused("cannot resume", out, resume=True, settings={**SETTINGS, "epochs": 3, "seed": 1, "trainable": "all"})
    assert message == (
        'cannot resume: --epochs differs (run.json 2, now 3); --seed differs (not in run.json, now 1); '
        '--trainable differs (run.json "last-block", now "all")'
    )
    # bookkeeping may differ: a progress bar on a terminal after a batch job, more checkpoints kept
    assert check(out, command="classify", settings={**SETTINGS, "progress": False, "keep": 5, "checkpoint_every": 20}, resume=True) == "resume"
    # a caller may allow more settings to differ (e.g. more epochs)
    assert check(out, command="classify", settings={**SETTINGS, "epochs": 3}, resume=True, ignore=frozenset({"epochs"})) == "resume"
    refused("cannot resume: ", out, resume=True, command="instruct")
    assert "holds a run of `classify`, not `instruct`" in refused("cannot resume", out, resume=True, command="instruct")


def test_resume_needs_a_run(tmp_path):
    refused(f"cannot resume: {tmp_path / 'none'} holds no run (no run.json)", tmp_path / "none", resume=True)
    assert not (tmp_path / "none").exists()


def test_flag_and_path_mistakes(tmp_path):
    refused("--resume and --overwrite exclude each other", tmp_path / "x", resume=True, overwrite=True)
    (tmp_path / "file").write_text("")
    refused("exists and is not a directory", tmp_path / "file")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{not json")
    refused("unreadable run record", tmp_path / "bad", resume=True)
    refused("unreadable run record", tmp_path / "bad", overwrite=True)
    assert (tmp_path / "bad" / "run.json").exists()


def test_a_live_owner_excludes_everyone_else(tmp_path):
    out = tmp_path / "out"
    run = start(out)
    (out / "checkpoints" / "1").mkdir(parents=True)
    (out / "checkpoints" / "1" / "commit_success.txt").write_text("ok")
    for kw in ({}, {"resume": True}, {"overwrite": True}):
        message = refused("in use by a running jaxft process", out, **kw)
        assert f"(pid {os.getpid()} on " in message
    assert (out / "checkpoints" / "1").exists()  # overwrite deleted nothing
    run.mark("interrupted", "SIGTERM")
    run.release()
    with start(out, resume=True) as again:
        assert again.latest_checkpoint() == 1


OWNER = textwrap.dedent(
    """
    import sys, time
    from jaxft.rundir import claim
    claim(sys.argv[1], command="classify", settings={"lr": 5e-05})
    print("claimed", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_owner_leaves_a_resumable_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(out)], env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"claimed\n"
        refused("in use by a running jaxft process", out, settings={"lr": 5e-05}, resume=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    # the kernel dropped the lock; run.json still says "running": an unfinished run
    refused("holds an unfinished run of `classify` (status running, its process gone, no checkpoint)", out, settings={"lr": 5e-05})
    with claim(out, command="classify", settings={"lr": 5e-05}, resume=True) as run:
        assert run.mode == "resume" and run.latest_checkpoint() is None


def test_resume_removes_what_a_killed_attempt_half_wrote(tmp_path):
    """Atomic writes leave `.NAME.XXXX.tmp` files and folders behind a process killed mid-write;
    the next attempt, holding the lock, removes them (and nothing else)."""
    out = tmp_path / "out"
    finished_run(out, "interrupted", checkpoint_steps=(3,))
    stale = [out / ".loss-plot.png.p8k953of.tmp", out / "data" / ".train.csv.x1y2.tmp", out / ".model.abc123.tmp"]
    (out / "data").mkdir()
    stale[0].write_bytes(b"half a plot")
    stale[1].write_text("half a split")
    stale[2].mkdir()
    (stale[2] / "config.json").write_text("{}")
    kept = [out / ".hidden-notes.txt", out / "data" / "train.csv"]
    for path in kept:
        path.write_text("mine")
    with claim(out, command="classify", settings=SETTINGS, resume=True):
        pass
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    assert (out / "checkpoints" / "3" / "commit_success.txt").exists()


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def test_overwrite_refused_when_something_cannot_be_removed_removes_nothing(tmp_path, monkeypatch):
    """A directory of the old run this process may not write (checkpoints/ of another user, say):
    refused before anything goes, the old run whole (as root, chmod stops nothing: os.access
    answers as it would for such a directory)."""
    out = tmp_path / "out"
    finished_run(out, "completed", checkpoint_steps=(3,))
    before = _tree(out)
    real = os.access
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False if Path(path).name == "checkpoints" else real(path, mode))
    refused(f"cannot overwrite {out}: {out / 'checkpoints'}: permission denied; nothing was removed", out, overwrite=True)
    assert _tree(out) == before


def test_overwrite_whose_move_aside_fails_puts_everything_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    finished_run(out, "completed", checkpoint_steps=(3,))
    before = _tree(out)
    real = os.rename

    def rename(src, dst):
        if Path(src).name == "model":  # after checkpoints/ and metrics.json have moved
            raise PermissionError(13, "Permission denied", str(src))
        return real(src, dst)

    monkeypatch.setattr(rundir.os, "rename", rename)
    with pytest.raises(RunDirError, match=f"cannot overwrite {out}: {out / 'model'}: permission denied; nothing was removed"):
        start(out, overwrite=True)
    assert _tree(out) == before


def test_overwrite_deletes_the_old_run_only_once_the_new_one_owns_the_directory(tmp_path, monkeypatch):
    """A removal that fails anyway (here checkpoints/) leaves the new run in charge, the old
    files set aside where the warning says, not a half-deleted directory without an owner."""
    out = tmp_path / "out"
    finished_run(out, "completed", checkpoint_steps=(3,))
    real = rundir.shutil.rmtree
    seen = []

    def rmtree(path, ignore_errors=False, **kw):
        seen.append(json.loads((out / "run.json").read_text())["status"])
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(Path(path) / "checkpoints"))
        return real(path, ignore_errors=ignore_errors, **kw)

    monkeypatch.setattr(rundir.shutil, "rmtree", rmtree)
    with pytest.warns(rundir.RunDirWarning, match="could not delete all of the previous run") as warned:
        run = start(out, overwrite=True, settings={**SETTINGS, "lr": 1.0})
    with run:
        assert seen[0] == "running" and record(out)["settings"]["lr"] == 1.0  # the new run's record came first
        assert "checkpoints: permission denied" in str(warned[0].message)
        assert run.latest_checkpoint() is None
    # a later resume sweeps what is left, as it does atomic writes' temporaries
    monkeypatch.setattr(rundir.shutil, "rmtree", real)
    with start(out, resume=True, settings={**SETTINGS, "lr": 1.0}):
        assert sorted(p.name for p in out.iterdir()) == ["run.json"]


OVERWRITE = textwrap.dedent(
    """
    import sys
    from jaxft.rundir import RunDirError, claim
    try:
        claim(sys.argv[1], command="classify", settings={"lr": 1.0}, overwrite=True)
    except RunDirError as exc:
        sys.exit(str(exc))
    """
)


def test_overwrite_of_a_run_with_an_unwritable_directory_removes_nothing(tmp_path):
    """A real permission error (for root: without the capabilities that override permission bits)."""
    out = tmp_path / "out"
    finished_run(out, "completed", checkpoint_steps=(3,))
    before = _tree(out)
    prefix = [] if os.geteuid() != 0 else ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    (out / "checkpoints").chmod(0o555)
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        try:
            result = subprocess.run([*prefix, sys.executable, "-c", OVERWRITE, str(out)], env=env, capture_output=True, text=True, timeout=120)
        except OSError:
            pytest.skip("no setpriv here")
    finally:
        (out / "checkpoints").chmod(0o755)
    if prefix and result.stderr.startswith("setpriv:"):
        pytest.skip(f"setpriv cannot drop the capabilities here: {result.stderr[-300:]}")
    assert result.stderr.strip() == f"cannot overwrite {out}: {out / 'checkpoints'}: permission denied; nothing was removed"
    assert _tree(out) == before
