"""Frozen-trunk caching: the split model equals the whole one, cached training equals uncached."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

from jaxft import losses, model, optim, packing, steps, train, trunk
from jaxft.config import GPTConfig
from jaxft.data.spam import EncodedSplit
from jaxft.model import init_params
from jaxft.recipes import classify
from jaxft.tokenizer import PAD_ID
from jaxft.settings import TrainerSettings
from jaxft.weights.common import flatten

TINY = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_layers=3, n_heads=4)  # PAD_ID is a token
TOL = 1e-6


def _classifier(config=TINY, seed=0, lora_rank=0):
    config, params = classify.with_classifier_head(config, init_params(config, jax.random.PRNGKey(seed)), 2, jax.random.PRNGKey(seed + 1))
    if lora_rank:
        from jaxft.lora import add_lora

        config, params = add_lora(config, params, lora_rank, 16.0, jax.random.PRNGKey(seed + 2))
    return config, params


def _split(rs, n, width=20, vocab=500):
    """Rows of random tokens padded with PAD_ID after `lengths`."""
    lengths = rs.randint(1, width + 1, n).astype(np.int32)
    tokens = np.full((n, width), PAD_ID, np.int32)
    for row, length in enumerate(lengths):
        tokens[row, :length] = rs.randint(0, vocab, length)
    return EncodedSplit(tokens, rs.randint(0, 2, n).astype(np.int32), lengths)


# --------------------------------------------------------------------------- the split model


@pytest.mark.parametrize("n_blocks", [0, 1, 2, 3])
def test_suffix_of_trunk_features_equals_model_apply(n_blocks):
    config, params = _classifier()
    split = _split(np.random.RandomState(n_blocks), 13)
    whole = np.asarray(jax.jit(lambda p, t: model.apply(config, p, t))(params, split.tokens))
    hidden = trunk.trunk_features(config, params, split.tokens, n_blocks, batch_size=5)  # 3 batches, the last padded
    assert hidden.shape == (13, 20, 32) and hidden.dtype == np.float32 and isinstance(hidden, np.ndarray)
    parts = np.asarray(jax.jit(lambda p, h: trunk.suffix_apply(config, p, h, n_blocks))(params, hidden))
    assert np.abs(parts - whole).max() <= TOL
    for pooling in ("last", "last-non-pad", "mean"):
        a, b = (np.asarray(losses.pool(x, split.lengths, pooling)) for x in (parts, whole))
        assert np.abs(a - b).max() <= TOL
    # Causal: a batch may cut cached rows to its longest text, as it cuts token rows.
    width = 9
    cut = np.asarray(trunk.suffix_apply(config, params, hidden[:, :width], n_blocks))
    assert np.abs(cut - np.asarray(model.apply(config, params, split.tokens[:, :width]))).max() <= TOL


def test_suffix_apply_rejects_a_block_outside_the_model():
    config, params = _classifier()
    with pytest.raises(ValueError, match="outside 0..3"):
        trunk.suffix_apply(config, params, np.zeros((1, 4, 32), np.float32), 4)


# --------------------------------------------------------------------------- when to cache


@pytest.mark.parametrize(
    "trainable, final_norm, prefix",
    [("head", None, 3), ("head", True, 3), ("last-block", None, 2), ("last-2-blocks", False, 1), ("last-3-blocks", None, 0), ("all", None, 0)],
)
def test_frozen_prefix_blocks(trainable, final_norm, prefix):
    config, params = _classifier()
    assert trunk.frozen_prefix_blocks(config, optim.trainable_mask(config, params, trainable, final_norm)) == prefix


def _plan(config, params, trainable, enabled=True, max_bytes=1e9, rows=10, seq=20):
    mask = optim.trainable_mask(config, params, trainable)
    return trunk.plan(config, mask, enabled=enabled, rows=rows, seq=seq, max_bytes=max_bytes)


def test_plan_uses_the_cache_only_where_exact_and_within_the_bound():
    config, params = _classifier()
    used = _plan(config, params, "last-block")
    assert used.used and used.start_block == 2 and used.bytes == 10 * 20 * 32 * 4
    assert _plan(config, params, "head").start_block == 3
    reasons = {
        "all": _plan(config, params, "all"),
        "off": _plan(config, params, "last-block", enabled=False),
        "dropout": _plan(config.replace(drop_rate=0.1), params, "last-block"),
        "bound": _plan(config, params, "last-block", max_bytes=25_599),
    }
    lora_config, lora_params = _classifier(lora_rank=2)
    reasons["lora"] = _plan(lora_config, lora_params, "lora")
    assert not any(p.used for p in reasons.values())
    assert "first block" in reasons["all"].reason
    assert "off" in reasons["off"].reason
    assert "dropout 0.1" in reasons["dropout"].reason
    assert "over the" in reasons["bound"].reason and "trunk-cache-max-gb" in reasons["bound"].reason
    assert "LoRA" in reasons["lora"].reason
    assert _plan(config, params, "last-block", max_bytes=25_600).used  # the bound is inclusive


@pytest.mark.parametrize("pooling", ["last", "first", "last-non-pad"])
@pytest.mark.parametrize("n_blocks", [None, 2, 3])  # the whole model, a suffix of one block, of none
def test_pooled_last_block_equals_pooling_the_whole_output(pooling, n_blocks):
    """pool_index: the last block computes one query per row; logits and gradients are those of
    pooling every position's logits."""
    config, params = _classifier()
    split = _split(np.random.RandomState(7), 6)
    tokens, lengths, labels = (jax.numpy.asarray(x) for x in (split.tokens, split.lengths, split.labels))
    hidden = None if n_blocks is None else jax.numpy.asarray(trunk.trunk_features(config, params, split.tokens, n_blocks))

    def logits(p, index=None):
        if n_blocks is None:
            return model.apply(config, p, tokens, pool_index=index)
        return trunk.suffix_apply(config, p, hidden, n_blocks, pool_index=index)

    def loss(p, pooled):
        index = losses.pool_index(pooling, lengths, *tokens.shape)
        out = logits(p, index) if pooled else losses.pool(logits(p), lengths, pooling)
        return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean(), out

    (loss_pooled, out_pooled), grads_pooled = jax.jit(jax.value_and_grad(lambda p: loss(p, True), has_aux=True))(params)
    (loss_whole, out_whole), grads_whole = jax.jit(jax.value_and_grad(lambda p: loss(p, False), has_aux=True))(params)
    assert out_pooled.shape == (6, 2) and np.abs(np.asarray(out_pooled) - np.asarray(out_whole)).max() <= TOL
    assert abs(float(loss_pooled) - float(loss_whole)) <= TOL
    flat_pooled, flat_whole = flatten(jax.device_get(grads_pooled)), flatten(jax.device_get(grads_whole))
    assert flat_pooled.keys() == flat_whole.keys()
    for key in flat_whole:  # fp32 rounding: TOL relative to the leaf's largest gradient (some are ~5)
        scale = max(1.0, float(np.abs(flat_whole[key]).max()))
        assert np.abs(flat_pooled[key] - flat_whole[key]).max() <= TOL * scale, key
    assert np.abs(flat_whole["ln_f/scale"]).max() > 1e-4
    if n_blocks != 3:  # the last block runs, and gets gradients
        assert np.abs(flat_whole["h_2/mlp/c_fc/kernel"]).max() > 1e-4
    if pooling != "last":  # a row's pooled position decides the output: other positions give others
        other = jax.numpy.full((6,), 3, jax.numpy.int32)
        assert np.abs(np.asarray(logits(params, other)) - np.asarray(out_whole)).max() > 1e-4


def test_pool_index_positions():
    lengths = jax.numpy.asarray([1, 5, 30, 0])
    assert losses.pool_index("last", lengths, 4, 20).tolist() == [19] * 4
    assert losses.pool_index("first", None, 4, 20).tolist() == [0] * 4
    assert losses.pool_index("last-non-pad", lengths, 4, 20).tolist() == [0, 4, 19, 0]
    assert losses.pool_index("mean", lengths, 4, 20) is None
    with pytest.raises(ValueError, match="needs the per-row lengths"):
        losses.pool_index("last-non-pad", None, 4, 20)
    with pytest.raises(ValueError, match="only the model's last block"):
        model.run_blocks(TINY, {}, jax.numpy.zeros((4, 20, 32)), 0, 1, pool_index=lengths)


# --------------------------------------------------------------------------- training


def _task(trainable, cache, padding="longest", pooling="last", seed=3, dtype="float32"):
    rs = np.random.RandomState(seed)
    data = classify.ClassificationData(_split(rs, 40), _split(rs, 11), _split(rs, 9), ["a", "b"], 20)
    recipe = classify.ClassifierRecipe(
        trainer=TrainerSettings(trainable=trainable, batch_size=4, lr=1e-3, seed=seed, dtype=dtype), pooling=pooling, padding=padding,
        trunk_cache=cache,
    )
    return recipe, classify.ClassificationTask(recipe, data)


def _train(trainable, cache, padding, pooling, n_steps=10, opt=None, dtype="float32"):
    recipe, task = _task(trainable, cache, padding, pooling, dtype=dtype)
    config, params = _classifier(seed=5)
    mask = optim.trainable_mask(config, params, trainable)
    opt = opt or optim.adamw(1e-3, 0.1)
    state = train.init_state(params, mask, opt, seed=0)
    logged = []
    options = task.step_options(config, state.params, mask, logged.append)
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    train_step, eval_step = steps.make_steps(config, opt, "classification", pooling=pooling, dtype=compute, **options)
    step_losses = []
    for epoch in range(3):
        for batch in task.train_batches(epoch):
            if len(step_losses) == n_steps:
                break
            state, m = train_step(state, batch)
            step_losses.append(float(m["loss"]))
    evals = {split: steps.evaluate(eval_step, state.params, task.eval_batches(split)) for split in ("validation", "test")}
    return task, options, np.array(step_losses), flatten(jax.device_get(state.params)), evals, logged


@pytest.mark.parametrize(
    "trainable, padding, pooling",
    [("head", "longest", "last"), ("last-block", "longest", "last"), ("last-2-blocks", "batch", "last-non-pad"), ("last-block", "bucket", "mean"),
     ("last-block", "bucket", "last-non-pad"), ("last-2-blocks", "bucket", "first")],  # the last two: packed cached rows
)
def test_cached_training_equals_uncached(trainable, padding, pooling):
    task, options, cached, params_c, evals_c, logged = _train(trainable, None, padding, pooling)
    assert task.packs() == (padding == "bucket" and pooling != "mean")
    _, no_options, plain, params_p, evals_p, _ = _train(trainable, False, padding, pooling)
    assert options == {"start_block": {"head": 3, "last-block": 2, "last-2-blocks": 1}[trainable]} and no_options == {}
    assert task.trunk_cache["used"] and task.trunk_cache["bytes"] == (40 + 11 + 9) * 20 * 32 * 4
    assert task.trunk_cache["seconds"] > 0 and "Trunk cache:" in logged[0]
    assert len(cached) == 10 and np.abs(cached - plain).max() <= TOL
    for split in evals_c:
        assert abs(evals_c[split]["loss"] - evals_p[split]["loss"]) <= TOL
        assert evals_c[split]["accuracy"] == evals_p[split]["accuracy"]
    # The parameters, under plain SGD. (The cached and uncached programs fuse the pooled last
    # block differently and round an ulp apart; AdamW divides by sqrt(v), so where a gradient
    # is rounding noise, e.g. the key bias, whose gradient is zero in theory, it turns an ulp
    # into lr-sized steps. SGD moves every parameter by lr times its gradient: rounding stays
    # rounding, and every leaf must agree.)
    _, _, cached, params_c, _, _ = _train(trainable, None, padding, pooling, opt=optax.sgd(0.1))
    _, _, plain, params_p, _, _ = _train(trainable, False, padding, pooling, opt=optax.sgd(0.1))
    assert np.abs(cached - plain).max() <= TOL and params_c.keys() == params_p.keys()
    for key in params_c:
        assert np.abs(params_c[key] - params_p[key]).max() <= TOL, key
    initial = flatten(_classifier(seed=5)[1])
    assert np.abs(params_c["cls_head/kernel"] - initial["cls_head/kernel"]).max() > 1e-3  # SGD did train


def test_cached_bfloat16_training_equals_uncached():
    """--dtype bfloat16: the cached prefix computes in bf16 too, as the uncached step does."""
    task, options, cached, _, evals_c, _ = _train("last-block", None, "longest", "last", dtype="bfloat16")
    _, _, plain, _, evals_p, _ = _train("last-block", False, "longest", "last", dtype="bfloat16")
    assert options == {"start_block": 2} and task.trunk_cache["used"]
    assert np.abs(cached - plain).max() <= TOL
    assert all(abs(evals_c[split]["loss"] - evals_p[split]["loss"]) <= TOL for split in evals_c)


def _cached_and_plain(padding, pooling):
    """(config, params, a task with the last block's trunk cached, the same task uncached)."""
    _, task = _task("last-block", None, padding=padding, pooling=pooling)
    config, params = _classifier()
    task.step_options(config, params, optim.trainable_mask(config, params, "last-block"), lambda _: None)
    return config, params, task, _task("last-block", False, padding=padding, pooling=pooling)[1]


@pytest.mark.parametrize("pooling", ["last-non-pad", "first"])
def test_packed_cached_batches_hold_each_text_up_to_its_pooled_position(pooling):
    config, params, task, plain = _cached_and_plain("bucket", pooling)
    slots = plain_slots = 0
    for packed, token_batch in zip(task.train_batches(0), plain.train_batches(0)):
        expected = np.asarray(trunk.prefix_apply(config, params, token_batch["tokens"], 2))
        for i, (row, at) in enumerate(zip(packed["pool_row"], packed["pool_index"])):
            width = token_batch["lengths"][i] if pooling == "last-non-pad" else 1
            segment = packed["segments"][row] == packed["segments"][row, at]
            cols = np.flatnonzero(segment)
            assert len(cols) == width and cols[-1] == at  # the text's own positions, ending at the one read
            assert np.abs(packed["hidden"][row, cols] - expected[i, :width]).max() <= TOL
        np.testing.assert_array_equal(packed["labels"], token_batch["labels"])
        slots, plain_slots = slots + packed["hidden"].shape[0] * packed["hidden"].shape[1], plain_slots + token_batch["tokens"].size
        assert packed["hidden"].shape[1] == 20  # rows of the padded width: few shapes
    assert slots < plain_slots


@pytest.mark.parametrize("pooling", ["last", "last-non-pad"])
def test_batches_carry_the_cached_rows_in_the_token_order(pooling):
    config, params, task, plain = _cached_and_plain("batch", pooling)
    lengths = np.concatenate([getattr(task.data, name).lengths for name in classify.SPLITS])
    if pooling == "last":  # the last position (padding included) is read: every position computed
        assert task.trunk_cache["positions"] == 60 * 20
    else:  # only up to each row's last real token, packed into rows of 20
        rows = packing.pack(lengths, 20).rows  # (random texts: no two alike)
        assert task.trunk_cache["positions"] == rows * 20 < 60 * 20 and rows * 20 < 1.1 * lengths.sum() + 20
    for cached_batch, token_batch in zip(task.eval_batches("validation"), plain.eval_batches("validation")):
        assert "tokens" not in cached_batch and cached_batch["hidden"].shape[:2] == token_batch["tokens"].shape
        for key in ("labels", "lengths", "weights"):
            np.testing.assert_array_equal(cached_batch[key], token_batch[key])
        expected = np.asarray(trunk.prefix_apply(config, params, token_batch["tokens"], 2))
        real = cached_batch["weights"] > 0
        assert (cached_batch["hidden"][~real] == 0).all()  # weight-0 rows: zeros (token rows: PAD_ID)
        for row in np.flatnonzero(real):
            width = cached_batch["lengths"][row] if pooling != "last" else expected.shape[1]
            assert np.abs(expected[row, :width] - cached_batch["hidden"][row, :width]).max() <= TOL
            assert (cached_batch["hidden"][row, width:] == 0).all()  # never read: left zero


# --------------------------------------------------------------------------- the recipe


def _frames(seed=0):
    rs = np.random.RandomState(seed)
    words = {0: "awful bad terrible", 1: "great lovely wonderful"}
    rows = [(label, " ".join(rs.choice(words[label].split(), size=rs.randint(2, 6)))) for label in (0, 1) for _ in range(16)]
    frame = pd.DataFrame(rows, columns=["Label", "Text"]).sample(frac=1, random_state=seed).reset_index(drop=True)
    return frame[:20], frame[20:26], frame[26:]


def _run(tmp_path, name, tokenizer, **options):
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps({"n_vocab": 50257, "n_ctx": 32, "n_embd": 32, "n_head": 4, "n_layer": 2}))
    trainer = {"model": str(hparams), "init": "random", "epochs": 2, "batch_size": 4, "lr": 1e-3, "eval_freq": 3, "eval_iter": 2}
    trainer.update({k: options.pop(k) for k in list(options) if k in TrainerSettings.__dataclass_fields__})
    recipe = classify.ClassifierRecipe(trainer=TrainerSettings(**trainer), **options)
    recipe.validate()
    return classify.run(recipe, tmp_path / name, _frames(), ["neg", "pos"], tokenizer, log=lambda _: None)


def test_run_records_the_cache_and_matches_the_uncached_run(tmp_path, tokenizer):
    cached = _run(tmp_path, "cached", tokenizer)
    plain = _run(tmp_path, "plain", tokenizer, trunk_cache=False)
    written = json.loads((tmp_path / "cached" / "metrics.json").read_text())["trunk_cache"]
    assert written == cached["trunk_cache"]
    assert written["used"] and written["start_block"] == 1 and written["bytes"] == 32 * cached["padded_length"] * 32 * 4
    assert written["seconds"] > 0 and "frozen" in written["reason"]
    assert plain["trunk_cache"] == {"used": False, "reason": "turned off (--trunk-cache off)", "seconds": 0.0, "bytes": 0, "start_block": 0, "positions": 0}
    assert cached["train_step_compilations"] == 1
    for key in ("eval_train_losses", "eval_validation_losses"):
        assert np.abs(np.array(cached[key]) - np.array(plain[key])).max() <= TOL
    for key in ("train_loss", "validation_loss", "test_loss"):
        assert abs(cached[key] - plain[key]) <= TOL
    for key in ("train_accuracy", "validation_accuracy", "test_accuracy"):
        assert cached[key] == plain[key]


@pytest.mark.parametrize(
    "options, reason",
    [
        ({"trainable": "all"}, "no frozen prefix"),
        ({"trainable": "lora", "lora_rank": 2}, "LoRA"),
        ({"drop_rate": 0.1}, "dropout 0.1"),
        ({"trunk_cache_max_gb": 1e-6}, "over the 1e-06 GB bound"),
    ],
)
def test_run_falls_back_where_the_cache_is_not_exact_or_too_big(tmp_path, tokenizer, options, reason):
    metrics = _run(tmp_path, "run", tokenizer, epochs=1, **options)
    assert not metrics["trunk_cache"]["used"] and reason in metrics["trunk_cache"]["reason"]


def test_the_cache_pass_shows_progress_unless_turned_off(capsys):
    """Over 20 batches the trunk pass reports its progress (plain lines off a terminal);
    `progress=False` (what --no-progress passes) silences it, and only the summary is logged."""
    config, params = _classifier()
    split = _split(np.random.RandomState(0), 48)
    mask = optim.trainable_mask(config, params, "last-block")
    for progress, shown in ((None, True), (False, False)):
        logged = []
        trunk.cache_splits(config, params, mask, {"train": split.tokens}, enabled=True, batch_size=2, max_bytes=1e9,
                           log=logged.append, progress=progress)
        assert ("trunk features:" in capsys.readouterr().out) == shown
        assert len(logged) == 1 and logged[0].startswith("Trunk cache:")


def test_cli_turns_the_cache_off():
    from jaxft.cli.classify import register
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["finetune-classifier", "--out", "o", "--trunk-cache", "off", "--trunk-cache-max-gb", "2"])
    assert args.trunk_cache is False and args.trunk_cache_max_gb == 2.0
    assert parser.parse_args(["finetune-classifier", "--out", "o"]).trunk_cache is None
    with pytest.raises(ValueError, match="trunk-cache-max-gb"):
        classify.ClassifierRecipe(trunk_cache_max_gb=-1).validate()
