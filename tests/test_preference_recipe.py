"""`jaxft finetune-preference` end to end on a tiny random-init model: metrics.json's keys, the
reference's log lines, plots, both models' test responses (the reference's are the starting
model's, or with LoRA the base's), the loss options, and an exact resume that keeps the
precomputed reference log-probabilities."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft.cli import main
from jaxft.config import from_hparams
from jaxft.data import preference as pdata
from jaxft.recipes.common import resolve_model
from jaxft.recipes.instruct import untie_head
from jaxft.recipes.preference import PreferenceRecipe, run
from jaxft.responses import generate_responses
from jaxft.settings import TrainerSettings

TINY = {"n_vocab": 50257, "n_ctx": 128, "n_embd": 32, "n_head": 4, "n_layer": 2}
COMMON = ["--init", "random", "--limit", "40", "--batch-size", "4", "--max-steps", "4", "--eval-freq", "2", "--eval-iter", "1",
          "--max-new-tokens", "6", "--lr", "1e-3", "--compile-cache", "off", "--no-progress"]


@pytest.fixture(scope="module")
def hparams(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "hparams.json"
    path.write_text(json.dumps(TINY))
    return path


def _cli(hparams: Path, out: Path, *extra: str) -> dict:
    assert main(["finetune-preference", "--model", str(hparams), "--out", str(out), *COMMON, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def _initial_model_responses(hparams: Path, entries: list[dict], tokenizer, lora: bool = False) -> list[str]:
    """What the starting model (the reference) answers: the recipe's random init, untied."""
    key_model, _ = jax.random.split(jax.random.PRNGKey(123))
    config, params = untie_head(*resolve_model(str(hparams), init="random", key=key_model))
    return generate_responses(config, params, entries, tokenizer, max_new_tokens=6, progress=False)


def test_default_run_writes_the_reference_metrics_lines_and_both_responses(hparams, tmp_path, capsys, tokenizer):
    out = tmp_path / "run"
    metrics = _cli(hparams, out)
    log = capsys.readouterr().out
    for key in ("initial_train_loss", "initial_validation_loss", "eval_train_losses", "eval_validation_losses", "eval_train_reward_margins",
                "eval_validation_reward_margins", "validation_loss", "test_loss", "validation_reward_margin", "test_reward_margin",
                "validation_reward_accuracy", "test_reward_accuracy", "train_seconds", "reference_logprobs_seconds"):
        assert key in metrics, key
    assert metrics["recipe"]["trainer"]["lr"] == 1e-3 and metrics["recipe"]["beta"] == 0.1 and metrics["recipe"]["logprob"] == "mean"
    assert abs(metrics["initial_train_loss"] - math.log(2)) < 1e-6 and abs(metrics["initial_validation_reward_margin"]) < 1e-6
    assert len(metrics["eval_train_reward_margins"]) == len(metrics["eval_steps"]) == 2
    assert 0 <= metrics["test_reward_accuracy"] <= 1
    assert {"data_s", "model_s", "compiles", "train_s", "outputs_s", "total_s"} <= set(metrics["timing"])
    rewards = metrics["validation_rewards"]
    assert rewards["rewards/margins"] == pytest.approx(0.1 * metrics["validation_reward_margin"])
    assert rewards["rewards/accuracies"] == metrics["validation_reward_accuracy"]
    assert "Training loss: 0.693" in log and "Ep 1 (Step 000002): Train loss " in log and ", Val reward margins " in log
    for name in ("loss-plot.png", "reward-margin-plot.png", "model/config.json"):
        assert (out / name).is_file(), name
    policy = json.loads((out / "policy-responses.json").read_text())
    reference = json.loads((out / "reference-responses.json").read_text())
    test_split = pdata.split_entries(pdata.load_entries(pdata.bundled_file())[:40]).test
    assert [e["instruction"] for e in policy] == [e["instruction"] for e in test_split] and all("model_response" in e for e in policy)
    assert [e["model_response"] for e in reference] == _initial_model_responses(hparams, test_split, tokenizer)


def test_lora_live_sum_hinge(hparams, tmp_path, tokenizer):
    """With LoRA the reference is the base with the adapters off: with B = 0 at the start it is
    the policy, so the hinge loss starts at relu(1 - 0) = 1."""
    out = tmp_path / "run"
    metrics = _cli(hparams, out, "--trainable", "lora", "--lora-rank", "2", "--reference-logprobs", "live", "--logprob", "sum",
                   "--loss", "hinge", "--no-responses")
    assert metrics["initial_train_loss"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["eval_train_losses"][-1] < 1.0  # it learns the pairs of its own batches
    assert not (out / "policy-responses.json").exists()


def _recipe(hparams: Path, **trainer) -> PreferenceRecipe:
    settings = TrainerSettings(model=str(hparams), init="random", trainable="all", epochs=1, batch_size=4, lr=1e-3, weight_decay=0.01,
                               eval_freq=1, eval_iter=1, max_steps=5, checkpoint_every=2, keep=5, progress=False, **trainer)
    return PreferenceRecipe(trainer=settings, limit=40, responses=False)


class Stop(Exception):
    pass


def test_resume_is_exact_and_keeps_the_reference_logprobs(hparams, tmp_path, tokenizer):
    recipe = _recipe(hparams)
    whole = run(recipe, tmp_path / "whole", None, tokenizer, log=lambda line: None, progress=False, checkpoint_dir=tmp_path / "ck-whole")

    def stop_at_step_3(line: str) -> None:  # after the checkpoint of step 2
        if line.startswith("Ep 1 (Step 000003)"):
            raise Stop
    with pytest.raises(Stop):
        run(recipe, tmp_path / "part", None, tokenizer, log=stop_at_step_3, progress=False, checkpoint_dir=tmp_path / "ck")
    stored = [p for p in (tmp_path / "ck").rglob("*") if p.is_file() and b"reference_logprobs" in p.read_bytes()[:1 << 22]]
    assert stored, "the checkpoint does not hold the reference log-probabilities"
    lines: list[str] = []
    resumed = run(recipe, tmp_path / "part", None, tokenizer, log=lines.append, progress=False, checkpoint_dir=tmp_path / "ck", resume=True)
    assert any(line.startswith("resuming from step 2") for line in lines)
    for key in ("eval_train_losses", "eval_validation_losses", "eval_train_reward_margins", "eval_validation_reward_margins",
                "validation_loss", "test_reward_margin"):
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)


def test_resume_refuses_an_edited_validation_split(hparams, tmp_path, tokenizer):
    recipe = _recipe(hparams)
    entries = pdata.load_entries(pdata.bundled_file())[:40]

    def stop_at_step_3(line: str) -> None:
        if line.startswith("Ep 1 (Step 000003)"):
            raise Stop
    with pytest.raises(Stop):
        run(recipe, tmp_path / "part", entries, tokenizer, log=stop_at_step_3, progress=False, checkpoint_dir=tmp_path / "ck")
    edited = [dict(e) for e in entries]
    validation = pdata.split_entries(edited).validation[0]
    validation["chosen"] += " (edited)"  # the same training split, another validation split
    with pytest.raises(ValueError, match="validation data"):
        run(recipe, tmp_path / "part", edited, tokenizer, log=lambda line: None, progress=False, checkpoint_dir=tmp_path / "ck", resume=True)
