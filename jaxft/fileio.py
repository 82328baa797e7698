"""Atomic writes of a file and of a directory: the one definition used for weights,
outputs, plots, responses and run records.

A reader (or a run resumed after a crash) sees either the previous file or directory or the
complete new one, never a half-written one: everything is written to a temporary sibling,
flushed to disk, and renamed into place. Every OSError while writing (a full disk, no
permission, a read-only filesystem, a path component that is a file) becomes one
`WriteError` line naming the file; the previous file stays intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


class WriteError(OSError):
    """Writing `path` failed; str() is one line: "<path>: cannot write: <reason>"."""

    def __init__(self, path: str | os.PathLike, reason: str, err: int | None = None) -> None:
        super().__init__(err, reason, str(path))
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: cannot write: {self.reason}"


def _reason(path: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        # mkdir/open below a regular file: name the component that is in the way.
        for parent in [path, *path.parents]:
            if parent.exists() and not parent.is_dir() and parent != path:
                return f"{parent} is not a directory"
    return reason


def _write_error(path: Path, exc: OSError, tmp_root: Path | None = None, final_root: Path | None = None) -> WriteError:
    """`exc` as a WriteError naming `path`; a path under a temporary directory is reported
    under the directory it will become (the user never sees our temporary names)."""
    if isinstance(exc, WriteError):
        if tmp_root is not None and final_root is not None and exc.path.is_relative_to(tmp_root):
            return WriteError(final_root / exc.path.relative_to(tmp_root), exc.reason, exc.errno)
        return exc
    if tmp_root is not None and final_root is not None and exc.filename:
        named = Path(os.fsdecode(exc.filename))
        if named.is_relative_to(tmp_root):
            return WriteError(final_root / named.relative_to(tmp_root), exc.strerror or str(exc), exc.errno)
    return WriteError(path, _reason(path, exc), exc.errno)


def _names_other_file(exc: OSError, ours: tuple[Path, Path]) -> bool:
    """Whether `exc` concerns a file other than ours (or inside them): the caller reading
    its input, say. Such an error is no write error and passes through unchanged."""
    if isinstance(exc, WriteError) or exc.filename is None:
        return False
    named = Path(os.fsdecode(exc.filename))
    return not any(named == p or named.is_relative_to(p) for p in ours)


def default_mode(directory: bool = False) -> int:
    """The mode an ordinary new file (or directory) gets under the current umask;
    mkstemp/mkdtemp would leave it private to its owner."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    # Linux reports it; setting and resetting it (the portable way) would briefly give
    # files that other threads (a background checkpoint save) create a umask of 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some filesystems cannot open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Raise the WriteError that writing `path` would meet, before any work is done: a
    path component that is a file, or a location without write permission. Changes
    nothing. `directory`: `path` is a directory to create or fill (else a file to create
    or replace, which needs its directory writable). What `path` itself is (a file where a
    directory is wanted, say) is the caller's question."""
    path = Path(path)
    try:
        dangling = path.is_symlink() and not path.exists()
        is_dir = directory and path.is_dir()
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent  # the nearest one that exists: where mkdir starts
    except PermissionError:  # a directory on the way that may not be searched
        raise WriteError(path, f"{_unsearchable(path)}: permission denied", errno.EACCES) from None
    if dangling:
        raise WriteError(path, f"a dangling symbolic link (to {os.readlink(path)}); remove it or name another path", errno.ENOENT)
    if is_dir:
        if not os.access(path, os.W_OK | os.X_OK):
            raise WriteError(path, "permission denied", errno.EACCES)
        return
    if not ancestor.is_dir():
        raise WriteError(path, f"{ancestor} is not a directory", errno.ENOTDIR)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise WriteError(path, f"{ancestor}: permission denied", errno.EACCES)


def _unsearchable(path: Path) -> Path:
    """The first directory above `path` that this process may not search (stat below it fails)."""
    for parent in reversed(path.parents):
        if not os.access(parent, os.X_OK):
            return parent
    return path.parent


TMP_SUFFIX = ".tmp"  # atomic writes' temporaries; also jaxft.rundir's moved-aside run


def _temporary_name(path: Path) -> dict[str, str]:
    """mkstemp/mkdtemp's name for a temporary beside `path`: `.NAME.XXXX.tmp` (hidden; see
    `remove_stale_temporaries`)."""
    return {"prefix": f".{path.name}.", "suffix": TMP_SUFFIX}


_OLD = re.compile(r"\.(.+)\.[0-9a-f]{8}\.old")  # `atomic_dir`'s previous directory, renamed aside


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove what atomic writes left in `directory` and its subdirectories (`.NAME.XXXX.tmp`
    files and folders: a process killed mid-write; `.NAME.XXXXXXXX.old`, the previous directory
    of a swap killed between its two renames: put back as NAME where NAME is missing, else
    removed); what was removed or put back. Run only where no write can be under way (a run directory this
    process has just locked)."""
    stale = lambda entry: entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX) and entry.name.count(".") >= 3
    old = lambda entry: _OLD.fullmatch(entry.name) is not None and entry.is_dir() and not entry.is_symlink()
    removed = [entry for entry in directory.iterdir() if stale(entry) or old(entry)]
    for folder in directory.iterdir():
        if folder.is_dir() and not folder.is_symlink() and folder not in removed:
            removed += [entry for entry in folder.iterdir() if stale(entry) or old(entry)]
    for entry in removed:
        match = _OLD.fullmatch(entry.name)
        original = entry.with_name(match.group(1)) if match else None
        if original is not None and not original.exists() and not original.is_symlink():
            with contextlib.suppress(OSError):  # (failing, it stays: it may be the only copy)
                os.rename(entry, original)  # the swap's new directory never arrived: the previous one is the output
        else:
            _remove(entry)
    return removed


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(path, exc) from None


@contextlib.contextmanager
def _removed_on_failure(path: Path, tmp: Path, *names: Path) -> Iterator[None]:
    """Remove the temporary `tmp` when the body fails; an OSError from writing becomes one
    `WriteError` line naming `path` (an error about some other file passes through)."""
    try:
        yield
    except OSError as exc:
        _remove(tmp)
        if _names_other_file(exc, (tmp, path)):
            raise
        raise _write_error(path, exc, *names) from None
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write (by name: for writers
    such as safetensors' save_file); on success it is fsynced and renamed onto `path`.
    On any error nothing changes at `path` and the temporary file is removed."""
    path = Path(path)
    _make_parent(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, **_temporary_name(path))
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from None
    tmp = Path(name)
    with _removed_on_failure(path, tmp):
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data reaches the disk before the rename makes it visible
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise _write_error(path, exc) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_strict_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf; also NumPy/JAX scalars and arrays)
    replaced by None, NumPy/JAX scalars and arrays turned into Python numbers and lists,
    and tuples into lists. Other types are returned as they are."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: to_strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict_json(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "__array__") and hasattr(value, "dtype"):  # np.generic, np.ndarray, jax.Array
        import numpy as np

        return to_strict_json(np.asarray(value).tolist())
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` atomically as strict JSON (indent 2, trailing newline).

    NaN and ±inf, which JSON cannot represent, are written as null: a caller storing a
    value that may be non-finite records why it can be null (e.g. "loss": null with
    "loss_note": "no validation batches"), since null alone does not say.
    """
    text = json.dumps(to_strict_json(data), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path` in one
    rename, so no reader ever pairs new files with old ones (new weights, old config).

    An existing `path` is renamed aside first, then removed. On any error `path` is left as
    it was and the temporary directory is removed. The directory gets an ordinary output
    directory's mode (the umask's)."""
    path = Path(path)
    _make_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, **_temporary_name(path)))
        os.chmod(tmp, default_mode(directory=True))
    except OSError as exc:
        raise _write_error(path, exc) from None
    with _removed_on_failure(path, tmp, tmp, path):
        yield tmp
        _fsync_tree(tmp)
        if path.exists() or path.is_symlink():
            old = _old_name(path)
            os.rename(path, old)  # `path` is aside now (a fresh name: nothing there to replace)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the previous one back
                raise
            _fsync_dir(path.parent)
            _remove(old)
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            file = Path(dirpath) / name
            if file.is_symlink():
                continue
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    """Remove a temporary file or directory, quietly: the error being reported matters more."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
