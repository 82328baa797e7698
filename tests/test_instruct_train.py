"""Instruction fine-tuning end to end on the real data: it learns, compiles a handful of
times, writes every output, and `jaxft respond` reproduces the responses from the saved model.

One CLI run (module fixture) serves several tests: a small random-init GPT-2 (no pretrained
weights here), all parameters trained, on ../shared/data/instruction-data.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from jaxft import weights
from jaxft.config import GPTConfig
from jaxft.data import instruct
from jaxft.weights import native
from reference_gpt import GPTModel, config_dict

TINY = {"n_vocab": 50257, "n_ctx": 128, "n_embd": 32, "n_head": 4, "n_layer": 2}
MAX_STEPS, LR, MAX_NEW = 25, 1e-2, 16
CONTRACT_KEYS = ("initial_train_loss", "initial_validation_loss", "final_train_loss", "final_validation_loss")


def _hparams(directory, **changes):
    path = directory / "hparams.json"
    path.write_text(json.dumps({**TINY, **changes}))
    return path


def _cli(argv: list[str]) -> tuple[int, str, str]:
    from jaxft.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(shared_data, tmp_path_factory):
    """`jaxft finetune-instruct --init random` on the real file (its 935/55/110 splits)."""
    tmp = tmp_path_factory.mktemp("instruct")
    out = tmp / "run"
    code, log, err = _cli([
        "finetune-instruct", "--data", str(shared_data / "instruction-data.json"), "--model", str(_hparams(tmp)),
        "--init", "random", "--out", str(out), "--epochs", "1", "--max-steps", str(MAX_STEPS), "--batch-size", "8",
        "--lr", str(LR), "--seed", "123", "--trainable", "all", "--eval-freq", "10", "--eval-iter", "5",
        "--max-new-tokens", str(MAX_NEW), "--response-batch-size", "16", "--export-pth",
    ])
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    return {"out": out, "log": log, "err": err, "metrics": metrics, "tmp": tmp}


def test_random_init_model_halves_its_validation_loss(run):
    m = run["metrics"]
    print(
        f"\nrandom-init GPT-2 (32 wide, 2 layers), {m['steps']} steps at lr {LR}: validation loss "
        f"{m['initial_validation_loss']:.3f} -> {m['final_validation_loss']:.3f} (whole split {m['validation_loss']:.3f}), "
        f"train {m['initial_train_loss']:.3f} -> {m['final_train_loss']:.3f}; {m['train_seconds']:.0f} s training, "
        f"{m['total_seconds']:.0f} s in all; compilations: train {m['train_step_compilations']}, "
        f"eval {m['eval_step_compilations']}, generate {m['generate_compilations']}"
    )
    for key in CONTRACT_KEYS:
        assert math.isfinite(m[key]), key
    assert m["initial_validation_loss"] > 10.0  # ~ln(50257): a random model
    assert m["final_validation_loss"] <= m["initial_validation_loss"] / 2
    assert m["final_train_loss"] <= m["initial_train_loss"] / 2
    assert m["split_sizes"] == {"train": 935, "validation": 55, "test": 110}
    assert m["steps"] == MAX_STEPS and m["eval_steps"] == [0, 10, 20]
    # Tokens seen as the reference counts them (input_batch.numel() of tightly padded batches of 8).
    assert 8 * 50 <= m["eval_tokens_seen"][0] <= 8 * 100 and m["tokens_seen"] > m["eval_tokens_seen"][-1]


def test_the_run_compiles_a_handful_of_times(run):
    m = run["metrics"]
    shapes = {tuple(s) for s in m["train_batch_shapes"]}
    assert all(rows == 8 and width % 32 == 0 for rows, width in shapes)
    assert 1 <= m["train_step_compilations"] <= len(shapes) <= 3
    assert m["eval_step_compilations"] <= 4  # train and validation/test bucket widths
    assert m["generate_compilations"] <= 4  # the per-epoch sample and a few prompt buckets


def test_log_has_the_seed_lines(run, shared_data):
    log = run["log"]
    assert "Training loss:" in log and "Validation loss:" in log
    assert "Ep 1 (Step 000000): Train loss" in log and "Ep 1 (Step 000020)" in log
    first = instruct.split_entries(instruct.load_entries(shared_data / "instruction-data.json")).validation[0]
    prompt = instruct.format_prompt(first, "alpaca").replace("\n", " ")
    samples = [line for line in log.splitlines() if line.startswith(prompt)]
    assert len(samples) == 1 and len(samples[0]) > len(prompt)  # after the epoch: the first validation entry, continued
    assert "Training completed in" in log


def test_outputs_responses_plots_and_model(run, shared_data):
    out = run["out"]
    test_split = instruct.split_entries(instruct.load_entries(shared_data / "instruction-data.json")).test
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    assert len(responses) == 110
    for entry, expected in zip(responses, test_split):
        assert {k: entry[k] for k in expected} == expected
        assert isinstance(entry["model_response"], str) and "### Response:" not in entry["model_response"]
    for name in ("loss-plot.pdf", "loss-plot.png"):
        assert (out / name).stat().st_size > 1000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no scratch files left

    config, params = weights.load(out / "model")
    assert config.emb_dim == 32 and not config.tie_embeddings
    assert native.load_metadata(out / "model")["style"] == "alpaca"
    # The reference's .pth: loads strictly into GPTModel; its out_head trained apart from tok_emb.
    ref = GPTModel(config_dict(GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_layers=2, n_heads=4)))
    state = torch.load(out / "model-sft.pth", weights_only=True)
    ref.load_state_dict(state, strict=True)
    assert not torch.equal(state["out_head.weight"], state["tok_emb.weight"])
    np.testing.assert_array_equal(state["out_head.weight"].numpy(), np.asarray(params["lm_head"]["kernel"]).T)


def test_respond_reproduces_the_responses_from_the_saved_model(run):
    out, tmp = run["out"], run["tmp"]
    saved = json.loads((out / "instruction-data-with-response.json").read_text())
    prompts_only = tmp / "prompts.json"  # no output field: respond does not need one
    prompts_only.write_text(json.dumps([{"instruction": e["instruction"], "input": e["input"]} for e in saved]))
    answer = tmp / "answers.json"
    code, printed, err = _cli([
        "respond", "--model", str(out / "model"), "--data", str(prompts_only), "--out", str(answer),
        "--max-new-tokens", str(MAX_NEW), "--batch-size", "16", "--quiet",
    ])
    assert code == 0, err
    got = json.loads(answer.read_text())
    assert [e["model_response"] for e in got] == [e["model_response"] for e in saved]
    assert "wrote 110 responses" in printed


# --------------------------------------------------------------------------- user mistakes


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"instruction": "a", "output": "b"},', "malformed JSON at line 1"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "entry 1: missing required field 'output'"),
        ('[{"instruction": "a", "output": 3}]', "entry 0: field 'output' must be a string"),
        ("", "file is empty"),
    ],
)
def test_bad_data_is_a_one_line_error_and_writes_nothing(tmp_path, text, message):
    data = tmp_path / "bad.json"
    data.write_text(text)
    out = tmp_path / "run"
    code, _, err = _cli(["finetune-instruct", "--data", str(data), "--model", str(_hparams(tmp_path)), "--init", "random", "--out", str(out)])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "bad.json" in err and message in err, err
    assert not out.exists()  # nothing written, not even the directory

    # respond checks the data before loading a model (an entry without output is fine there).
    code, _, err = _cli(["respond", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "r.json")])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ("no-model" if "missing required field 'output'" in message else "bad.json") in err, err
    assert not (tmp_path / "r.json").exists()


def test_other_mistakes_are_one_line_errors(tmp_path, shared_data):
    real = shared_data / "instruction-data.json"
    hparams = str(_hparams(tmp_path))
    base = ["finetune-instruct", "--model", hparams, "--init", "random", "--out", str(tmp_path / "run"), "--max-new-tokens", "16"]

    code, _, err = _cli([*base, "--data", str(tmp_path / "missing.json")])
    assert code == 2 and "missing.json" in err and len(err.strip().splitlines()) == 1

    code, _, err = _cli([*base, "--data", str(real), "--limit", "20", "--batch-size", "32"])  # 17 / 2 / 1 entries
    assert code == 2 and "batch size 32 is larger than the 17 training entries" in err

    code, _, err = _cli([*base, "--data", str(real), "--limit", "5"])
    assert code == 2 and "split empty" in err

    long = tmp_path / "long.json"
    entries = [{"instruction": f"question {i}", "input": "", "output": "answer"} for i in range(40)]
    entries[7]["instruction"] = "word " * 200
    long.write_text(json.dumps(entries))
    code, _, err = _cli([*base, "--data", str(long), "--batch-size", "2"])
    assert code == 2 and "long.json: entry 7: prompt is" in err and "context length 128" in err
    assert not (tmp_path / "run" / "metrics.json").exists()

    code, _, err = _cli([*base, "--data", str(real), "--max-new-tokens", "128"])  # the last flag wins
    assert code == 2 and "smaller than the context length (128)" in err
