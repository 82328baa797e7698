"""`--compile-cache DIR` stores the compiled steps, so a rerun compiles nothing new; `off` stores nothing."""

from __future__ import annotations

import os
import subprocess
import sys

from test_classify import _tiny_hparams, _write_csvs


def _run(tmp_path, out, cache):
    csvs = _write_csvs(tmp_path)
    argv = [
        sys.executable, "-m", "jaxft", "finetune-classifier", "--train", str(csvs["train"]),
        "--validation", str(csvs["validation"]), "--test", str(csvs["test"]), "--model", str(_tiny_hparams(tmp_path)),
        "--init", "random", "--epochs", "1", "--batch-size", "4", "--eval-freq", "5", "--out", str(out), "--compile-cache", str(cache),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_rerun_finds_every_program_in_the_cache(tmp_path):
    cache = tmp_path / "cache"
    _run(tmp_path, tmp_path / "a", cache)
    first = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(first) >= 2  # at least the train and eval steps
    _run(tmp_path, tmp_path / "b", cache)
    # A hit reads an entry; a miss would compile and write it again (a new mtime) or add one.
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == first


def test_off_stores_nothing(tmp_path):
    _run(tmp_path, tmp_path / "a", "off")
    assert not (tmp_path / "xdg" / "jaxft").exists()  # the default cache directory was not made either
