"""The GPU session's first part (scripts/bench_step_parts.py) runs end to end at tiny shapes, so a
lent GPU's few minutes are not lost to a broken script: every part asked for is timed, and the
padded-head step is the padded one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_step_parts_times_the_step_with_and_without_the_padded_head(tmp_path):
    out = tmp_path / "parts.json"
    argv = [sys.executable, str(SCRIPTS / "bench_step_parts.py"), "--quick", "--size", "64x2x2", "--shape", "2x32",
            "--parts", "step,step-padded,head-padded", "--chunks", "4000000", "--out", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"].split(",")[0] for r in rows] == ["step", "step", "head-padded"]
    assert all(r["ms"] > 0 and r["calls"] >= 1 for r in rows)
    assert rows[0].get("vocab_multiple") is None and rows[1]["vocab_multiple"] == 64 and "50304" in rows[1]["part"]
