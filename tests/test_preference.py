"""DPO against the reference's own pieces (tests/reference_dpo.py): its collate, log-probabilities and
loss, and its training loop over 10 steps with the same weights and batch order (per-evaluation
losses and reward margins within 1e-5 relative), with precomputed and with live reference
log-probabilities; with the policy equal to the reference the loss is ln 2 and the margins 0."""

from __future__ import annotations

import copy
import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxft import weights
from jaxft.config import GPTConfig
from jaxft.data import preference as pdata
from jaxft.preference_losses import dpo_losses, sequence_logprobs
from jaxft.recipes.preference import PreferenceRecipe, run
from jaxft.settings import TrainerSettings
from jaxft.weights import torch_ref
from reference_dpo import PreferenceDataset, compute_dpo_loss, compute_logprobs, custom_collate_fn, loader, train_model_dpo_simple
from reference_gpt import random_reference_model

# GPT-2's vocabulary (the real tokenizer), everything else tiny.
CONFIG = GPTConfig(vocab_size=50257, context_length=96, emb_dim=32, n_layers=2, n_heads=4, tie_embeddings=False)
REL = 1e-5
WORDS = ["apple", "river", "stone", "cloud", "music", "garden", "window", "letter", "planet", "candle"]


def entries(n: int = 50) -> list[dict]:
    rs = np.random.RandomState(0)
    out = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        out.append({
            "instruction": f"Write a sentence about the {word}.", "input": "" if i % 3 else f"Use the word {WORDS[(i + 3) % 10]}.",
            "output": f"The {word} is here.",
            "chosen": " ".join(rs.choice(WORDS, rs.randint(2, 12))) + ", please.",
            "rejected": " ".join(rs.choice(WORDS, rs.randint(1, 9))) + "!",
        })
    return out


def test_collate_is_the_references(tokenizer):
    data = entries(9)
    ref = PreferenceDataset(data, tokenizer)
    tokens = pdata.tokenize_entries(data, tokenizer, max_length=CONFIG.context_length)
    for limit in (None, 40):
        expected = custom_collate_fn([ref[i] for i in range(9)], allowed_max_length=limit)
        ours = pdata.collate(tokens.prompt_lengths, tokens.chosen, tokens.rejected, allowed_max_length=limit)
        for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
            np.testing.assert_array_equal(ours[key], expected[key].numpy(), err_msg=key)
    # bucketed batches: the same arrays, widened with pad tokens and a False mask
    batch = next(pdata.preference_batches(tokens, 9, shuffle=False, drop_last=False, seed=0, allowed_max_length=None, bucket_multiple=32))
    tight = custom_collate_fn([ref[i] for i in range(9)])
    width = tight["chosen"].shape[1]
    assert batch["chosen"].shape[1] % 32 == 0 and batch["chosen"].shape[1] > width
    np.testing.assert_array_equal(batch["chosen"][:, :width], tight["chosen"].numpy())
    assert not batch["chosen_mask"][:, width:].any() and (batch["chosen"][:, width:] == 50256).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_logprobs_and_losses_are_the_references(reduction):
    rs = np.random.RandomState(1)
    logits = rs.randn(3, 7, 11).astype(np.float32)
    labels = rs.randint(0, 11, (3, 7))
    mask = rs.rand(3, 7) < 0.7
    mask[:, 1] = True
    ours = np.asarray(sequence_logprobs(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), reduction))
    expected = compute_logprobs(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(mask)).numpy()
    if reduction == "sum":  # the reference's mean times the scored count
        expected = expected * mask[:, 1:].sum(-1)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)

    pc, pr, rc, rr = (rs.randn(5).astype(np.float32) for _ in range(4))
    losses, chosen, rejected = dpo_losses(pc, pr, rc, rr, beta=0.1)
    ref = compute_dpo_loss(*(torch.from_numpy(x) for x in (pc, pr, rc, rr)), beta=0.1)
    np.testing.assert_allclose([float(losses.mean()), float(chosen.mean()), float(rejected.mean())], [t.item() for t in ref], rtol=1e-6)
    # TRL's variants, written as TRL writes them
    h = torch.from_numpy((pc - pr) - (rc - rr))
    smooth, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    np.testing.assert_allclose(smooth, (-F.logsigmoid(0.5 * h) * 0.8 - F.logsigmoid(-0.5 * h) * 0.2).numpy(), rtol=1e-6)
    hinge, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.5, loss="hinge")
    np.testing.assert_allclose(hinge, torch.relu(1 - 0.5 * h).numpy(), rtol=1e-6)
    ipo, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.5, loss="ipo")
    np.testing.assert_allclose(ipo, ((h - 1 / (2 * 0.5)) ** 2).numpy(), rtol=1e-6)


def _recipe(reference_logprobs: str, model: str, **extra) -> PreferenceRecipe:
    # lr 5e-3: a margin is a difference of log-probabilities near -ln(50257) = -10.8, whose fp32
    # rounding (~1e-6 absolute, on either side) a margin must outgrow for 1e-5 relative to test anything
    trainer = TrainerSettings(model=model, trainable="all", epochs=1, batch_size=4, lr=5e-3, weight_decay=0.01, eval_freq=2, eval_iter=2,
                              max_steps=10, progress=False)
    return PreferenceRecipe(trainer=trainer, reference_logprobs=reference_logprobs, responses=False,
                            allowed_max_length=CONFIG.context_length, **extra)


@pytest.fixture(scope="module")
def reference_run(tokenizer, tmp_path_factory):
    """The reference's loop on a random model; the same weights saved as a jaxft model."""
    model = random_reference_model(CONFIG, seed=3)
    config, params = torch_ref.state_dict_to_params(CONFIG, model.state_dict())
    path = weights.export(config, params, tmp_path_factory.mktemp("model") / "model", "jaxft")
    data = entries()
    splits = pdata.split_entries(data)
    collate = functools.partial(custom_collate_fn, allowed_max_length=CONFIG.context_length)
    train_loader = loader(PreferenceDataset(splits.train, tokenizer), 4, shuffle=True, seed=123, collate_fn=collate)
    val_loader = loader(PreferenceDataset(splits.validation, tokenizer), 4, shuffle=False, seed=123, collate_fn=collate)
    policy, reference = model, copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-3, weight_decay=0.01)
    tracking = train_model_dpo_simple(policy, reference, train_loader, val_loader, optimizer, num_epochs=1, beta=0.1, eval_freq=2,
                                      eval_iter=2, start_context=None, tokenizer=tokenizer, max_steps=10, log=lambda line: None, sample=False)
    return str(path), data, tracking


def _assert_close(label: str, ours, theirs) -> None:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    rel = np.abs(ours - theirs) / np.abs(theirs)
    print(f"\n[dpo parity] {label}: max relative difference {rel.max():.2e}")
    assert ours.shape == theirs.shape and (rel <= REL).all(), (label, ours, theirs)


@pytest.mark.parametrize("reference_logprobs", ["precompute", "live"])
def test_ten_steps_match_the_references_loop(reference_logprobs, reference_run, tokenizer, tmp_path):
    path, data, tracking = reference_run
    lines: list[str] = []
    metrics = run(_recipe(reference_logprobs, path), tmp_path / "out", data, tokenizer, log=lines.append, progress=False)
    assert metrics["eval_steps"] == [0, 2, 4, 6, 8] and metrics["steps"] == 10
    _assert_close("train losses", metrics["eval_train_losses"], tracking["train_losses"])
    _assert_close("validation losses", metrics["eval_validation_losses"], tracking["val_losses"])
    margins = lambda split: np.subtract(tracking[f"{split}_chosen_rewards"], tracking[f"{split}_rejected_rewards"])
    _assert_close("train reward margins", metrics["eval_train_reward_margins"], margins("train"))
    _assert_close("validation reward margins", metrics["eval_validation_reward_margins"], margins("val"))
    assert abs(metrics["eval_validation_reward_margins"][-1]) > 0.01  # the margins moved: the comparison means something
    # the reference's log line and the tokens seen (batch["chosen"].numel())
    logged = [line for line in lines if line.startswith("Ep 1 (Step 000004)")]
    assert logged and ", Train reward margins " in logged[0] and ", Val reward margins " in logged[0]
    assert metrics["eval_tokens_seen"] == tracking["tokens_seen"]


@pytest.mark.parametrize("reference_logprobs", ["precompute", "live"])
def test_policy_equal_to_the_reference_gives_ln2_and_zero_margins(reference_logprobs, reference_run, tokenizer, tmp_path):
    path, data, _ = reference_run
    recipe = _recipe(reference_logprobs, path)
    recipe = PreferenceRecipe(**{**recipe.__dict__, "trainer": TrainerSettings(**{**recipe.trainer.__dict__, "max_steps": 1})})
    lines: list[str] = []
    metrics = run(recipe, tmp_path / "out", data, tokenizer, log=lines.append, progress=False)
    for key in ("initial_train_loss", "initial_validation_loss"):
        assert abs(metrics[key] - math.log(2)) <= 1e-6, (key, metrics[key])
    for key in ("initial_train_reward_margin", "initial_validation_reward_margin"):
        assert abs(metrics[key]) <= 1e-6, (key, metrics[key])
    assert any(line.startswith("Training loss: 0.693") for line in lines)
