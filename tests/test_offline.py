"""Both fine-tuning commands run end to end with no network, no tiktoken cache and no
vocabulary or data flag: the package's bundled vocabulary and data sets are enough."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
OFFLINE_SECTION = README.split("## Offline use", 1)[1].split("\n## ", 1)[0]
# The minimal hparams.json README's "Offline use" shows: the runs below train exactly that one.
TINY = json.loads(OFFLINE_SECTION.split("```json", 1)[1].split("```", 1)[0])

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


def test_the_readme_command_offline_names_the_next_steps(tmp_path):
    """README's main command needs GPT-2's weights: offline it ends in one line saying what
    works instead, and creates nothing."""
    env = {k: v for k, v in os.environ.items() if k != "JAXFT_GPT2_VOCAB"}
    argv = [sys.executable, "-c", RUNNER, "finetune-classifier", "--out", "runs/spam"]
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    line = lines[0]
    assert line.startswith("jaxft finetune-classifier: error: could not download gpt2/124M/checkpoint: tried 2 URL(s)")
    assert line.endswith(
        "; offline? --init random trains from random weights (with --model a size name or an hparams.json), "
        "`jaxft download 124M` fetches the weights where online, and --model DIR uses weights already on disk"
    )
    assert list(tmp_path.iterdir()) == []  # no run directory, no half-made gpt2/124M


def test_the_readme_shows_a_minimal_hparams_json_and_how_to_use_it():
    assert set(TINY) == {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"}  # every key from_hparams reads, no other
    assert TINY["n_vocab"] == 50257  # the GPT-2 tokenizer's: a smaller vocabulary is refused
    assert "--init random --model hparams.json" in OFFLINE_SECTION
