"""Failures outside the bad-input matrix (tests/test_bad_inputs.py), each one line: a real
permission error (for root, without the capabilities that override permission bits), a reader
of the output gone away, respond's --out onto a file it did not write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxft.cli import main
from test_bad_inputs import FC, LABELED_OK, RESPOND, RUNNER, inputs, one_line  # noqa: F401 (inputs: the fixture)


def _unprivileged(probe: Path) -> list[str]:
    """A command prefix under which permission bits apply: none for a user, and for root (who may
    read and write anything) setpriv without the capabilities that override them. `probe`: a
    scratch path, to see that the prefix works here."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    probe.write_text("")
    probe.chmod(0o000)
    try:
        result = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe)!r})"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        result = None
    probe.unlink()
    if result is None or b"PermissionError" not in result.stderr:
        pytest.skip("root, and setpriv cannot drop the capabilities that override permission bits here")
    return prefix


@pytest.mark.parametrize("case", ["unreadable-data", "unreadable-weights", "unsearchable-out"])
def test_a_permission_error_says_permission_denied(case, inputs, tmp_path):
    """Not "No such file or directory" (what safetensors says of a file it may not open), and not
    Python's "[Errno 13] ..." either: the path and "permission denied", one line."""
    prefix = _unprivileged(tmp_path / "probe")
    if case == "unreadable-data":
        locked = tmp_path / "train.csv"
        locked.write_text(LABELED_OK)
        argv = [*FC, "--train", str(locked), "--validation", "{in}/train.csv", "--test", "{in}/train.csv"]
        code, message = 2, f"{locked}: permission denied"
    elif case == "unreadable-weights":
        shutil.copytree(inputs / "lm", tmp_path / "lm")
        locked = tmp_path / "lm" / "params.safetensors"  # (config.json stays readable: the weights fail)
        argv = [*RESPOND[:2], str(tmp_path / "lm"), *RESPOND[3:], "--max-new-tokens", "2"]
        code, message = 2, f"{locked}: permission denied"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        argv = [*FC[:6], str(locked / "out"), *FC[7:]]
        code, message = 1, f"{locked / 'out'}: cannot write: {locked}: permission denied"
    argv = [a.replace("{in}", str(inputs)).replace("{out}", str(tmp_path / "out")) for a in argv]
    locked.chmod(0o000)
    try:
        result = subprocess.run([*prefix, sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert one_line(result.stderr) == f"jaxft {argv[0]}: error: {message}"
    assert result.returncode == code
    assert not (tmp_path / "out").exists()


def test_classify_into_a_closed_pipe_exits_quietly(inputs):
    """`jaxft classify ... | head -1`: no "Broken pipe" error, no "Exception ignored" at exit, and
    the status of a Unix tool that SIGPIPE ended, 141. (The reader here is gone before the first write.)"""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "jaxft", "classify", "--model", str(inputs / "clf"), "hello", "win money"],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141


def test_respond_replaces_its_own_responses_file_and_any_other_only_with_overwrite(inputs, tmp_path, capsys):
    data = tmp_path / "two.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 2))
    out = tmp_path / "responses.json"
    argv = [*RESPOND[:4], str(data), "--out", str(out), "--max-new-tokens", "2", "-q"]
    argv = [a.replace("{in}", str(inputs)) for a in argv]
    assert main(argv) == 0
    first = out.read_bytes()
    assert main(argv) == 0 and out.read_bytes() == first  # a rerun replaces what respond wrote
    out.write_text("my notes\n")
    assert main(argv) == 2 and out.read_text() == "my notes\n"
    assert main([*argv, "--overwrite"]) == 0 and out.read_bytes() == first
    capsys.readouterr()
