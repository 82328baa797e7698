"""jaxft.fileio: atomic file and directory writes, strict JSON, one-line write errors."""

from __future__ import annotations

import errno
import json
import math
import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import fileio
from jaxft.fileio import WriteError, atomic_dir, atomic_write_bytes, atomic_write_text, write_json


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- files


def test_write_bytes_and_text(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "c.txt", "héllo\n")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_text(tmp_path / "c.txt", "again")
    assert (tmp_path / "c.txt").read_text() == "again"
    assert listing(tmp_path) == ["a", "c.txt"]  # no temporary files left


def test_files_get_the_umask_mode(tmp_path, umask_002):
    # mkstemp makes owner-only files; an output file is an ordinary file
    atomic_write_bytes(tmp_path / "f", b"x")
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o664
    os.umask(0o077)
    atomic_write_bytes(tmp_path / "g", b"x")
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) == 0o600


def test_path_under_a_file(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    for target in (tmp_path / "runs" / "metrics.json", tmp_path / "runs" / "x" / "metrics.json"):
        with pytest.raises(WriteError) as excinfo:
            write_json(target, {"a": 1})
        assert one_line(excinfo.value) == f"{target}: cannot write: {tmp_path / 'runs'} is not a directory"
        assert isinstance(excinfo.value, OSError)
    assert (tmp_path / "runs").read_text() == "not a directory"


def full_disk_open(real_open=open):
    """`open` whose files fail to write as on a full disk."""

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    return lambda *a, **k: Full(real_open(*a, **k))


@pytest.mark.parametrize("where", ["write", "fsync", "replace", "mkstemp"])
def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch, where):
    target = tmp_path / "metrics.json"
    write_json(target, {"old": True})
    code = {"write": errno.ENOSPC, "fsync": errno.ENOSPC, "replace": errno.EROFS, "mkstemp": errno.EACCES}[where]

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if where == "write":
        monkeypatch.setattr(fileio, "open", full_disk_open(), raising=False)
    elif where == "mkstemp":
        monkeypatch.setattr(fileio.tempfile, "mkstemp", fail)
    else:
        monkeypatch.setattr(fileio.os, where, fail)
    with pytest.raises(WriteError) as excinfo:
        write_json(target, {"new": True})
    monkeypatch.undo()
    assert one_line(excinfo.value) == f"{target}: cannot write: {os.strerror(code)}"
    assert excinfo.value.errno == code
    assert json.loads(target.read_text()) == {"old": True}
    assert listing(tmp_path) == ["metrics.json"]


def test_safetensors_full_disk_is_a_write_error(tmp_path, monkeypatch):
    from jaxft.weights import native

    target = tmp_path / "params.safetensors"
    native.save_safetensors(target, {"a": np.zeros(3, np.float32)})
    before = target.read_bytes()

    def save_file(*args, **kwargs):  # what safetensors raises on a full disk
        raise RuntimeError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
    with pytest.raises(WriteError, match=r"params.safetensors: cannot write: No space left on device$"):
        native.save_safetensors(target, {"a": np.ones(3, np.float32)})
    assert target.read_bytes() == before
    assert listing(tmp_path) == ["params.safetensors"]


def test_reading_errors_are_not_write_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        with fileio.atomic_file(tmp_path / "out") as tmp:
            tmp.write_bytes((tmp_path / "missing-input").read_bytes())
    assert not isinstance(excinfo.value, WriteError)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- strict JSON


def test_write_json_is_strict(tmp_path):
    data = {
        "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "ok": 1.5, "int": 3, "bool": True, "none": None,
        "np_nan": np.float32("nan"), "np64": np.float64("inf"), "np_int": np.int64(7), "np_val": np.float32(0.5),
        "array": np.array([1.0, np.nan, -np.inf]), "jax": jnp.array([2.0, jnp.inf]), "jax_scalar": jnp.float32(jnp.nan),
        "nested": [{"t": (1.0, math.nan)}], "text": "NaN",
    }
    write_json(tmp_path / "m.json", data)
    text = (tmp_path / "m.json").read_text()
    assert text.endswith("}\n")
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded == {
        "nan": None, "inf": None, "-inf": None, "ok": 1.5, "int": 3, "bool": True, "none": None,
        "np_nan": None, "np64": None, "np_int": 7, "np_val": 0.5,
        "array": [1.0, None, None], "jax": [2.0, None], "jax_scalar": None,
        "nested": [{"t": [1.0, None]}], "text": "NaN",
    }
    json.dumps(fileio.to_strict_json(data), allow_nan=False)


# --------------------------------------------------------------------------- directories


def test_atomic_dir_creates_and_replaces(tmp_path, umask_002):
    target = tmp_path / "out" / "model"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "config.json").write_text("old config")
        (tmp / "params").write_text("old weights")
    assert listing(target) == ["config.json", "params"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o775  # an ordinary directory, not mkdtemp's 0o700

    with atomic_dir(target) as tmp:
        write_json(tmp / "config.json", {"new": 1})
        # until the block ends, readers still see the old pair
        assert (target / "config.json").read_text() == "old config"
    assert listing(target) == ["config.json"]  # nothing of the old directory is mixed in
    assert json.loads((target / "config.json").read_text()) == {"new": 1}
    assert listing(target.parent) == ["model"]  # no temporary or old directories left


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_error_changes_nothing(tmp_path, error):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(error):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("v2 half")
            raise error("boom")
    assert (target / "weights").read_text() == "v1"
    assert listing(tmp_path) == ["model"]


def test_atomic_dir_full_disk_names_the_final_file(tmp_path, monkeypatch):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(WriteError) as excinfo:
        with atomic_dir(target) as tmp:
            atomic_write_bytes(tmp / "config.json", b"{}")
            monkeypatch.setattr(fileio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
            atomic_write_bytes(tmp / "weights", b"v2")
    monkeypatch.undo()
    assert one_line(excinfo.value) == f"{target / 'weights'}: cannot write: No space left on device"
    assert (target / "weights").read_text() == "v1"
    assert listing(tmp_path) == ["model"]


def test_atomic_dir_failed_swap_restores_the_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp" in str(src):  # the new directory cannot be renamed into place
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(WriteError, match=f"^{target}: cannot write: Read-only file system$"):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("v2")
    monkeypatch.undo()
    assert (target / "weights").read_text() == "v1"
    assert listing(tmp_path) == ["model"]


def test_atomic_dir_under_a_file(tmp_path):
    (tmp_path / "runs").write_text("")
    with pytest.raises(WriteError, match=f"^{tmp_path / 'runs' / 'model'}: cannot write: {tmp_path / 'runs'} is not a directory$"):
        with atomic_dir(tmp_path / "runs" / "model"):
            pytest.fail("the block must not run")


KILLED_MID_SWAP = """
import os, sys
from pathlib import Path
import jaxft.fileio as fileio
target, when = Path(sys.argv[1]), sys.argv[2]
real_replace, real_remove = os.replace, fileio._remove
def replace(src, dst):
    if when == "between-renames" and ".tmp" in str(src):
        os._exit(9)  # killed after `model` went aside, before the new one came
    return real_replace(src, dst)
def remove(path):
    if when == "before-removal" and str(path).endswith(".old"):
        os._exit(9)  # killed after the swap, before the previous one was removed
    return real_remove(path)
fileio.os.replace, fileio._remove = replace, remove
with fileio.atomic_dir(target) as tmp:
    (tmp / "weights").write_text("v2")
"""


@pytest.mark.parametrize("when, survivor", [("between-renames", "v1"), ("before-removal", "v2")])
def test_a_swap_killed_between_its_renames_is_repaired_by_the_sweep(when, survivor, tmp_path):
    """Killed between the two renames, the previous directory is `.model.XXXXXXXX.old` and `model`
    is missing: the next run's sweep puts it back; killed after the swap, it removes the old one."""
    import subprocess
    import sys
    from pathlib import Path

    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    env = {**os.environ, "PYTHONPATH": str(Path(fileio.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", KILLED_MID_SWAP, str(target), when], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    assert [name for name in listing(tmp_path) if name.endswith(".old")], listing(tmp_path)
    fileio.remove_stale_temporaries(tmp_path)
    assert listing(tmp_path) == ["model"]
    assert (target / "weights").read_text() == survivor


def test_a_dangling_symbolic_link_is_named_as_such(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    for directory in (False, True):
        with pytest.raises(WriteError) as excinfo:
            fileio.check_writable(link, directory=directory)
        assert one_line(excinfo.value) == f"{link}: cannot write: a dangling symbolic link (to {tmp_path / 'gone'}); remove it or name another path"
