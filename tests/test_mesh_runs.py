"""Both fine-tuning commands on 8 host devices: `--mesh data=8`, `data=4,fsdp=2` and `fsdp=8`
train like one device (per-step losses within 1e-5 relative), reach the same accuracy and
give the same greedy responses; a batch size the mesh cannot split, or a mesh larger than
the machine, is one line before anything runs. The fsdp=8 instruction run also pads its LM
head's vocabulary (--head-vocab-multiple 64, a sharded head padded inside the step): still the
one-device losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_classify import _write_csvs

TINY = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}
MESHES = ("data=8", "data=4,fsdp=2", "fsdp=8")

# One interpreter runs both commands (JAX starts once); argv: out_dir, hparams, CSVs, the
# instruction command's own flags (JSON), then the flags of both.
DRIVER = """
import json, sys
from jaxft.cli import main
out, hparams, csvs, sft_extra, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5:]
common = ["--init", "random", "--model", hparams, "--seed", "3", "--no-progress", "--compile-cache", "off", *extra]
code = main(["finetune-classifier", "--train", csvs["train"], "--validation", csvs["validation"], "--test", csvs["test"],
             "--trainable", "last-block", "--epochs", "2", "--batch-size", "8", "--eval-freq", "3", "--lr", "1e-3",
             "--out", out + "/cls", *common])
code = code or main(["finetune-instruct", "--limit", "40", "--max-steps", "6", "--batch-size", "8", "--eval-freq", "2",
                     "--trainable", "all", "--max-new-tokens", "6", "--response-batch-size", "8", "--lr", "1e-3",
                     "--out", out + "/sft", *common, *sft_extra])
sys.exit(code)
"""


def _run(tmp_path: Path, name: str, devices: int, *extra: str, sft_extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps(TINY))
    csvs = {k: str(v) for k, v in _write_csvs(tmp_path).items()}
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    argv = [sys.executable, "-c", DRIVER, str(tmp_path / name), str(hparams), json.dumps(csvs), json.dumps(sft_extra), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh")
    results = {"one": _run(tmp, "one", 1)}
    for mesh in MESHES:
        sft_extra = ("--head-vocab-multiple", "64") if mesh == "fsdp=8" else ()
        results[mesh] = _run(tmp, mesh.replace(",", "_").replace("=", ""), 8, "--mesh", mesh, sft_extra=sft_extra)
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    load = lambda name, task: json.loads((tmp / name.replace(",", "_").replace("=", "") / task / "metrics.json").read_text())
    return {name: {task: load(name, task) for task in ("cls", "sft")} for name in results}


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("task", ["cls", "sft"])
def test_mesh_trains_like_one_device(runs, mesh, task):
    one, many = runs["one"][task], runs[mesh][task]
    assert many["mesh"] == mesh and one["mesh"] is None
    if task == "sft":
        assert many["recipe"]["head_vocab_multiple"] == (64 if mesh == "fsdp=8" else None)
    a, b = np.array(one["train_step_losses"]), np.array(many["train_step_losses"])
    assert a.shape == b.shape and len(a) >= 6
    np.testing.assert_allclose(b, a, rtol=1e-5)
    np.testing.assert_allclose(many["eval_validation_losses"], one["eval_validation_losses"], rtol=1e-5)
    if task == "cls":
        for split in ("train", "validation", "test"):
            assert many[f"{split}_accuracy"] == one[f"{split}_accuracy"]
    else:
        out = lambda name: json.loads(Path(runs[name]["sft"]["outputs"]["responses"]).read_text())
        assert [e["model_response"] for e in out(mesh)] == [e["model_response"] for e in out("one")]


def test_mesh_errors_are_one_line_before_anything_runs(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    hparams = tmp_path / "h.json"
    hparams.write_text(json.dumps(TINY))
    base = [sys.executable, "-m", "jaxft", "finetune-classifier", "--init", "random", "--model", str(hparams)]
    cases = [
        (["--mesh", "data=4,fsdp=4"], "needs 16 devices; 8 are available"),
        (["--mesh", "data=8", "--batch-size", "12"], "batch size 12 is not divisible by the 8 data-parallel devices"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        result = subprocess.run([*base, *extra, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert not out.exists()
