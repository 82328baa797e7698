"""A run directory has one owner: rules for starting, resuming and overwriting a run in OUT.

`OUT/run.json` records the run: `status` ("running", "completed", "failed" or
"interrupted", with a `reason` for the last two), `command` (the subcommand, e.g.
"classify"), `settings` (the resolved options, a JSON dict), `versions` (jaxft, jax, flax,
optax, orbax, python), `started`, `updated`, and `attempts` (host, pid and start time of
the first run and of every resume). Checkpoints live in `OUT/checkpoints`.

Rules (`check` applies them without touching anything, `claim` then takes the directory):
  * a missing or empty OUT: a fresh run;
  * OUT with any files, without resume or overwrite: refused, saying what is there (and,
    for an unfinished run, how to resume it);
  * overwrite: OUT is cleared first; only a directory holding a jaxft run (a run.json)
    is ever cleared, so a mistyped --out cannot delete unrelated files. Nothing is removed
    unless all of it can be: every directory in OUT must be writable, then the old entries
    are moved aside (into a hidden `OUT/.overwritten.XXXX.tmp`; moved back if a move fails),
    the new run.json is written, and only then is the old run deleted;
  * resume: OUT must hold an unfinished run of the same command with equal settings
    (apart from `RESUMABLE_DIFFERENTLY`);
  * a directory in use by a live process (which holds a lock on it) is refused in every case.

In a multi-process run only one process (jax.process_index() == 0) claims OUT.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import platform
import secrets
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import complete_steps
from .fileio import TMP_SUFFIX, WriteError, remove_stale_temporaries, to_strict_json, write_json

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, the other rules still hold
    fcntl = None

RUN_FILE = "run.json"
CHECKPOINTS_DIR = "checkpoints"
STATUSES = ("running", "completed", "failed", "interrupted")
UNFINISHED = ("running", "failed", "interrupted")
# Settings a run may resume with other values: the flags themselves; how attention and the LM
# head's loss are computed (the same functions: a run started with cuDNN's kernel and a padded head
# on a GPU may go on elsewhere); and the bookkeeping around the steps (a progress bar on a terminal
# after a batch job, another checkpoint interval or number kept).
RESUMABLE_DIFFERENTLY = frozenset({"resume", "overwrite", "attention", "head_vocab_multiple", "progress", "checkpoint_every", "keep"})


class RunDirError(Exception):
    """The run directory cannot be used as asked; str() is one line (the CLI exits 2)."""


class RunDirWarning(UserWarning):
    """Something about the run directory a user should know; not an error (one line)."""


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """The versions a run's results depend on."""
    from importlib import metadata

    out = {}
    for name, dist in (("jaxft", "jaxft"), ("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("optax", "optax"), ("orbax", "orbax-checkpoint")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    if out["jaxft"] == "not installed":  # run from a source tree
        out["jaxft"] = __version__
    out["python"] = platform.python_version()
    return out


def _normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as run.json will hold them (tuples as lists, NaN as null), so that a
    fresh value compares equal to its recorded one."""
    normalised = json.loads(json.dumps(to_strict_json(settings), allow_nan=False))
    if not isinstance(normalised, dict):
        raise TypeError(f"settings must be a dict, got {type(settings).__name__}")
    return normalised


def read_record(out: str | Path) -> dict[str, Any] | None:
    """OUT/run.json, or None when there is none. An unreadable one is a RunDirError."""
    path = Path(out) / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: unreadable run record ({exc}); move it away or choose another --out") from None
    if not isinstance(record, dict) or record.get("status") not in STATUSES:
        raise RunDirError(f"{path}: not a jaxft run record; move it away or choose another --out")
    return record


def _contents(out: Path, limit: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _lock(out: Path) -> int | None:
    """An exclusive lock on the directory itself (no lock file to leave behind), held until
    the returned descriptor is closed; the kernel drops it when the process dies, however
    it dies. None where the filesystem has no such locks."""
    fd = os.open(out, os.O_RDONLY)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            os.close(fd)
            record = read_record(out) or {}
            owner = (record.get("attempts") or [{}])[-1]
            who = f" (pid {owner.get('pid')} on {owner.get('host')})" if owner.get("pid") else ""
            raise RunDirError(f"{out}: in use by a running jaxft process{who}; wait for it or stop it first") from None
        # e.g. NFS without flock on directories: go on without the lock
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing releases the flock


def _settings_diff(recorded: dict[str, Any], current: dict[str, Any], ignore: frozenset[str]) -> list[str]:
    diffs = []
    for key in sorted(set(recorded) | set(current)):
        if key in ignore:
            continue
        flag = f"--{key.replace('_', '-')}"  # settings are named as their flags
        if key not in recorded:
            diffs.append(f"{flag} differs (not in run.json, now {json.dumps(current[key])})")
        elif key not in current:
            diffs.append(f"{flag} differs (run.json {json.dumps(recorded[key])}, now not set)")
        elif recorded[key] != current[key]:
            diffs.append(f"{flag} differs (run.json {json.dumps(recorded[key])}, now {json.dumps(current[key])})")
    return diffs


def check(
    out: str | Path,
    *,
    command: str,
    settings: dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    ignore: frozenset[str] = RESUMABLE_DIFFERENTLY,
) -> str:
    """Whether OUT may be used as asked, changing nothing: "fresh", "resume" or
    "overwrite", or a one-line RunDirError saying why not and what to do."""
    return _check(Path(out), command, settings, resume, overwrite, ignore, test_lock=True)


def _check(out: Path, command: str, settings: dict[str, Any], resume: bool, overwrite: bool, ignore: frozenset[str], test_lock: bool) -> str:
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: resume continues the run, overwrite starts it over")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a directory; choose another --out")
    try:
        empty = not out.exists() or not any(out.iterdir())
    except PermissionError:
        raise WriteError(out, "permission denied", errno.EACCES) from None  # (as fileio.check_writable says it)
    if empty:
        if resume:
            raise RunDirError(f"cannot resume: {out} holds no run (no {RUN_FILE}); run without --resume to start one")
        return "fresh"
    if test_lock:
        _unlock(_lock(out))  # refuses a directory a live run holds
    record = read_record(out)
    steps = complete_steps(out / CHECKPOINTS_DIR)
    if overwrite:
        if record is None:
            raise RunDirError(
                f"{out}: holds files that are not a jaxft run ({_contents(out)}; no {RUN_FILE}); "
                "refusing to delete them: choose another --out or remove them yourself"
            )
        _check_removable(out)
        return "overwrite"
    if not resume:
        if record is None:
            raise RunDirError(f"{out}: not empty ({_contents(out)}); choose another --out")
        status = record["status"]
        if status in UNFINISHED:
            # "running" with the lock free: the process died without recording why
            why = ", its process gone" if status == "running" else (f": {record['reason']}" if record.get("reason") else "")
            at = f", last checkpoint at step {steps[-1]}" if steps else ", no checkpoint"
            raise RunDirError(
                f"{out}: holds an unfinished run of `{record.get('command')}` (status {status}{why}{at}); "
                "pass --resume to continue it or --overwrite to start over"
            )
        raise RunDirError(
            f"{out}: holds a {status} run of `{record.get('command')}` ({_contents(out)}); pass --overwrite to replace it or choose another --out"
        )
    if record is None:
        raise RunDirError(f"cannot resume: {out} holds no {RUN_FILE} ({_contents(out)})")
    if record["status"] == "completed":
        raise RunDirError(f"cannot resume: the run in {out} has completed; pass --overwrite to run it again")
    if record.get("command") != command:
        raise RunDirError(f"cannot resume: {out} holds a run of `{record.get('command')}`, not `{command}`")
    diffs = _settings_diff(record.get("settings") or {}, _normalise(settings), ignore)
    if diffs:
        raise RunDirError(f"cannot resume: {'; '.join(diffs)}")
    return "resume"


class RunDir:
    """A claimed run directory: `path`, `record` (run.json's content), `mode` ("fresh",
    "resume" or "overwrite") and the lock that makes this process its one owner."""

    def __init__(self, path: Path, record: dict[str, Any], mode: str, lock_fd: int | None) -> None:
        self.path = path
        self.record = record
        self.mode = mode
        self._lock_fd = lock_fd

    @property
    def checkpoints(self) -> Path:
        """Where this run's checkpoints go (jaxft.checkpoint.Checkpointer(run.checkpoints))."""
        return self.path / CHECKPOINTS_DIR

    def latest_checkpoint(self) -> int | None:
        """The step of the newest complete checkpoint (None: start from the beginning)."""
        steps = complete_steps(self.checkpoints)
        return steps[-1] if steps else None

    def mark(self, status: str, reason: str | None = None) -> None:
        """Record `status` (one of STATUSES) and why (for "failed"/"interrupted") in run.json."""
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}; one of {', '.join(STATUSES)}")
        self.record["status"] = status
        if reason is None:
            self.record.pop("reason", None)
        else:
            self.record["reason"] = reason
        self.record["updated"] = now()
        write_json(self.path / RUN_FILE, self.record)

    def release(self) -> None:
        """Give up ownership (the process exiting does the same)."""
        _unlock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim(
    out: str | Path,
    *,
    command: str,
    settings: dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    ignore: frozenset[str] = RESUMABLE_DIFFERENTLY,
    argv: list[str] | None = None,
) -> RunDir:
    """Apply `check`'s rules, then take OUT: create it (fresh), clear it (overwrite) or keep
    it (resume), lock it for this process, and write run.json with status "running".
    `argv` (default sys.argv) is recorded for people, never compared."""
    out = Path(out)
    check(out, command=command, settings=settings, resume=resume, overwrite=overwrite, ignore=ignore)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(out, exc.strerror or str(exc), exc.errno) from None
    fd = _lock(out)
    try:
        # again under the lock: another process may have claimed OUT since `check`
        mode = _check(out, command, settings, resume, overwrite, ignore, test_lock=False)
        aside = _move_aside(out) if mode == "overwrite" else None
        attempt = {"started": now(), "host": socket.gethostname(), "pid": os.getpid(), "argv": list(sys.argv if argv is None else argv)}
        if mode == "resume":
            remove_stale_temporaries(out)  # half-written outputs of the attempt that was killed
            record = read_record(out) or {}
            record.pop("reason", None)
            if versions() != record.get("versions"):  # the run's versions stay those it started with
                attempt["versions"] = versions()
            record["attempts"] = [*record.get("attempts", []), attempt]
        else:
            record = {"command": command, "settings": _normalise(settings), "started": attempt["started"], "attempts": [attempt], "versions": versions()}
        record["status"] = "running"
        record["updated"] = now()
        try:
            write_json(out / RUN_FILE, record)
        except BaseException:
            if aside is not None:
                _move_back(out, aside, [entry.name for entry in aside.iterdir()])
            raise
    except BaseException:
        _unlock(fd)
        raise
    if aside is not None:
        _delete_aside(out, aside)  # the new run owns OUT now: the old one goes
    return RunDir(out, record, mode, fd)


def _denied(path: str | os.PathLike, exc: OSError | None = None) -> str:
    reason = "permission denied" if exc is None or exc.errno in (errno.EACCES, errno.EPERM) else (exc.strerror or str(exc))
    return f"{path}: {reason}"


def _check_removable(out: Path) -> None:
    """Refuse (changing nothing) an overwrite of `out` that could not remove all of it: each
    directory in it must be listable and writable (its entries removable)."""

    def refuse(what: str) -> None:
        raise RunDirError(f"cannot overwrite {out}: {what}; nothing was removed")

    def unlistable(exc: OSError) -> None:
        refuse(_denied(exc.filename, exc))

    for directory, _, _ in os.walk(out, onerror=unlistable):  # (symbolic links are not followed: removed as links)
        if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
            refuse(_denied(directory))


def _move_aside(out: Path) -> Path:
    """Move every entry of `out` into a new hidden directory in it (renames: nothing is copied or
    deleted); if one cannot move, the others go back and the overwrite is refused."""
    aside = out / f".overwritten.{secrets.token_hex(4)}{TMP_SUFFIX}"  # a stale temporary's name: a resume removes it
    try:
        aside.mkdir()
    except OSError as exc:
        raise RunDirError(f"cannot overwrite {out}: {_denied(aside, exc)}; nothing was removed") from None
    moved: list[str] = []
    for entry in sorted(out.iterdir()):
        if entry == aside:
            continue
        try:
            os.rename(entry, aside / entry.name)
        except OSError as exc:
            _move_back(out, aside, moved)
            raise RunDirError(f"cannot overwrite {out}: {_denied(entry, exc)}; nothing was removed") from None
        moved.append(entry.name)
    return aside


def _move_back(out: Path, aside: Path, names: list[str]) -> None:
    for name in reversed(names):
        os.rename(aside / name, out / name)
    aside.rmdir()


def _delete_aside(out: Path, aside: Path) -> None:
    """Delete the previous run, moved aside; what cannot be deleted stays there, with a warning."""
    try:
        shutil.rmtree(aside)
    except OSError as exc:
        shutil.rmtree(aside, ignore_errors=True)  # as much as can go
        warnings.warn(RunDirWarning(f"{out}: could not delete all of the previous run ({_denied(exc.filename or aside, exc)}); "
                                    f"what is left is in {aside}"), stacklevel=3)
