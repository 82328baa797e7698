"""Both fine-tuning commands run end to end with no network, no tiktoken cache and no
vocabulary or data flag: the package's bundled vocabulary and data sets are enough."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

TINY = {"n_vocab": 50257, "n_ctx": 128, "n_embd": 32, "n_head": 4, "n_layer": 2}

# Runs the CLI in a fresh interpreter whose sockets refuse to connect.
RUNNER = textwrap.dedent(
    """
    import socket, sys
    def refuse(*args, **kwargs):
        raise OSError("network disabled for this test")
    socket.socket.connect = refuse
    socket.create_connection = refuse
    from jaxft.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize(
    "command, extra",
    [
        ("finetune-classifier", ["--epochs", "1", "--eval-freq", "50"]),
        ("finetune-instruct", ["--epochs", "1", "--max-steps", "4", "--max-new-tokens", "4", "--response-batch-size", "64"]),
    ],
)
def test_commands_run_offline_from_bundled_assets(tmp_path, command, extra):
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps(TINY))
    env = {k: v for k, v in os.environ.items() if k != "JAXFT_GPT2_VOCAB"}
    env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "empty-tiktoken-cache")
    out = tmp_path / "run"
    argv = [sys.executable, "-c", RUNNER, command, "--init", "random", "--model", str(hparams), "--out", str(out), *extra]
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "model" / "config.json").is_file()
    if command == "finetune-classifier":
        assert metrics["split_sizes"] == {"train": 1045, "validation": 149, "test": 300}
    else:
        assert metrics["split_sizes"] == {"train": 935, "validation": 55, "test": 110}
    assert not any((tmp_path / "empty-tiktoken-cache").glob("*"))  # tiktoken's cache was never needed
