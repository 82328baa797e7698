"""The LM loss computed from the final-norm hidden states in chunks of rows (the training
and eval path, `steps.lm_metrics` -> `losses.lm_head_loss`) equals the plain path: full
logits from the model, then `losses.masked_lm_loss_terms`. Value and gradients with
respect to every parameter, within 1e-6 relative, for tied and untied heads, LoRA, ignored
targets (-100), a fully ignored row, a fully ignored batch, and chunk sizes that do not
divide the number of rows."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import losses, model, optim, steps, train
from jaxft.config import GPTConfig

RTOL = 1e-6  # per leaf: max |ours - plain| <= RTOL * max |plain|

BASE = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_layers=2, n_heads=4)
CONFIGS = {
    "tied": BASE,
    "untied": BASE.replace(tie_embeddings=False),
    "lora-untied": BASE.replace(tie_embeddings=False, lora_rank=2),
}


def _params(config: GPTConfig, seed: int = 0):
    params = model.init_params(config, jax.random.key(seed))
    # Non-trivial LayerNorms and LoRA B (zero at init), so every gradient is exercised.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "lora_b" in name or "scale" in name or "bias" in name:
            leaf = leaf + 0.05 * jax.random.normal(key, leaf.shape)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _batch(config: GPTConfig, rows: int = 3, seq: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (rows, seq + 1)).astype(np.int32)
    targets = ids[:, 1:].copy()
    targets[0, -3:] = losses.IGNORE_INDEX  # padding at the end of a row
    targets[1, 2] = losses.IGNORE_INDEX  # one masked position in the middle
    targets[2, :] = losses.IGNORE_INDEX  # a fully ignored row
    return {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(targets)}


def _plain(config, params, batch, dtype=jnp.float32):
    logits = model.apply(config, params, batch["inputs"], dtype=dtype)
    total, count = losses.masked_lm_loss_terms(logits, batch["targets"])
    return total / jnp.maximum(count, 1)


def _ours(config, params, batch, dtype=jnp.float32):
    return steps.lm_metrics(config, params, batch, dtype=dtype)[0]


def _assert_close(ours, plain, what):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree_util.tree_leaves(plain)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.abs(b).max()
        err = np.abs(a - b).max()
        assert np.all(np.isfinite(a)), f"{what}{jax.tree_util.keystr(path)}: not finite"
        assert err <= RTOL * scale, f"{what}{jax.tree_util.keystr(path)}: max |diff| {err:.3g} vs max |plain| {scale:.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_equal_the_plain_path(name):
    config = CONFIGS[name]
    params, batch = _params(config), _batch(config)
    plain_loss, plain_grads = jax.jit(jax.value_and_grad(lambda p: _plain(config, p, batch)))(params)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: _ours(config, p, batch)))(params)
    assert abs(float(loss) - float(plain_loss)) <= RTOL * abs(float(plain_loss))
    _assert_close(grads, plain_grads, f"{name} grad")
    # The head's gradient is not trivially zero, nor is any LoRA factor's.
    head = grads["wte"]["embedding"] if config.tie_embeddings else grads["lm_head"]["kernel"]
    assert float(jnp.abs(head).max()) > 0
    if config.lora_rank:
        assert float(jnp.abs(grads["h_0"]["attn"]["c_attn"]["lora_a"]).max()) > 0


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_model_hidden_states_in_small_chunks(name):
    """The model's final-norm output through the loss 5 rows at a time (36 rows: 8 chunks, padded)."""
    config = CONFIGS[name]
    params, batch = _params(config), _batch(config)

    def chunked(p):
        hidden = model.apply(config, p, batch["inputs"], return_hidden=True)
        head, layout = (p["wte"]["embedding"], "vd") if config.tie_embeddings else (p["lm_head"]["kernel"], "dv")
        return losses.lm_head_loss(hidden, head, batch["targets"], head_layout=layout, chunk_rows=5)[0]

    want = jax.jit(jax.value_and_grad(lambda p: _plain(config, p, batch)))(params)
    _assert_close(jax.jit(jax.value_and_grad(chunked))(params), want, f"{name} chunks of 5")


@pytest.mark.parametrize("layout", losses.HEAD_LAYOUTS)
@pytest.mark.parametrize("chunk_rows, vocab_multiple", [(1, None), (5, None), (12, None), (36, None), (1000, None), (5, 64), (1000, 8)])
def test_chunk_sizes_pad_and_agree(layout, chunk_rows, vocab_multiple):
    """36 rows in chunks of 1, 5 (padded to 40), 12, 36 and more than there are rows; and with the
    vocabulary of 97 padded to 128 or 104 (masked columns: the same loss and gradients)."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((3, 12, 32)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((32, 97) if layout == "dv" else (97, 32)), jnp.float32)
    targets = jnp.asarray(_batch(BASE)["targets"])

    def plain(h, w):
        logits = jnp.einsum("btd,dv->btv" if layout == "dv" else "btd,vd->btv", h, w)
        total, count = losses.masked_lm_loss_terms(logits, targets)
        return total / jnp.maximum(count, 1)

    def ours(h, w):
        return losses.lm_head_loss(h, w, targets, head_layout=layout, chunk_rows=chunk_rows, vocab_multiple=vocab_multiple)[0]

    want = jax.value_and_grad(plain, argnums=(0, 1))(hidden, head)
    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(hidden, head)
    _assert_close(got, want, f"{layout}/{chunk_rows}")
    assert float(jax.jit(ours)(hidden, head)) == pytest.approx(float(want[0]), rel=RTOL)  # no-grad path
    assert not np.asarray(got[1][0][2]).any()  # the fully ignored row gets no gradient


def test_fully_ignored_batch_gives_zero_loss_and_gradients():
    config = CONFIGS["untied"]
    params = _params(config)
    batch = _batch(config)
    batch["targets"] = jnp.full_like(batch["targets"], losses.IGNORE_INDEX)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: _ours(config, p, batch)))(params)
    assert float(loss) == 0.0 == float(_plain(config, params, batch))
    assert all(not np.asarray(g).any() for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_train_and_eval_steps_use_it(name):
    """make_steps' metrics (train and eval) are the plain path's loss and token count."""
    config = CONFIGS[name]
    params, batch = _params(config), _batch(config)
    opt = optim.adamw(1e-3, 0.1)
    state = train.init_state(params, optim.trainable_mask(config, params, "all"), opt)
    train_step, eval_step = train.make_steps(config, opt, "lm")
    plain = float(_plain(config, params, batch))
    evaluated = jax.device_get(eval_step(params, batch))
    _, metrics = train_step(state, batch)
    count = int((batch["targets"] != losses.IGNORE_INDEX).sum())
    for m in (evaluated, jax.device_get(metrics)):
        assert float(m["loss"]) == pytest.approx(plain, rel=RTOL)
        assert int(m["tokens"]) == count


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_train_steps_with_a_padded_vocabulary_equal_the_plain_ones(name):
    """make_steps(..., vocab_multiple=50): the head's matmuls over 100 columns instead of 97, the
    extra ones masked. The gradients equal the plain ones within RTOL (per leaf), and 3 AdamW
    steps give the same losses. (Parameters are not compared: where a gradient is near zero,
    Adam's normalisation turns rounding-level differences into update-sized ones.)"""
    config = CONFIGS[name]
    params, batch = _params(config), _batch(config)
    loss = {m: (lambda p, m=m: steps.lm_metrics(config, p, batch, vocab_multiple=m)[0]) for m in (None, 50)}
    grads = {m: jax.grad(fn)(params) for m, fn in loss.items()}
    _assert_close(grads[50], grads[None], "gradient")
    padded_head = re.compile(r"\[36,100\]")  # the logits of the 3 x 12 rows, 97 columns padded to 100
    traced = {m: str(jax.make_jaxpr(fn)(params)) for m, fn in loss.items()}
    assert padded_head.search(traced[50]) and not padded_head.search(traced[None])
    opt = optim.adamw(1e-3, 0.1)
    mask = optim.trainable_mask(config, params, "all")
    runs = {}
    for multiple in (None, 50):
        state = train.init_state(params, mask, opt)
        train_step, eval_step = steps.make_steps(config, opt, "lm", vocab_multiple=multiple)
        runs[multiple] = []
        for _ in range(3):
            state, metrics = train_step(state, batch)
            runs[multiple].append(float(metrics["loss"]))
        runs[multiple].append(float(eval_step(state.params, batch)["loss"]))
    np.testing.assert_allclose(runs[50], runs[None], rtol=RTOL)
    with pytest.raises(ValueError, match="vocab_multiple: a positive multiple for the lm task"):
        steps.make_steps(config, opt, "classification", vocab_multiple=50)


def test_bf16_compute_stays_close():
    """bf16 compute (parameters fp32): the head's matmul in the model's dtypes, loss near fp32's."""
    for name in ("tied", "untied"):
        config = CONFIGS[name]
        params, batch = _params(config), _batch(config)
        ours = float(jax.jit(lambda p: _ours(config, p, batch, jnp.bfloat16))(params))
        plain = float(jax.jit(lambda p: _plain(config, p, batch, jnp.bfloat16))(params))
        assert ours == pytest.approx(plain, rel=1e-2)


def test_accelerators_default_to_larger_chunks(monkeypatch):
    """667-row chunks on a CPU (memory); on a GPU or TPU one chunk of up to 2^30 logits, which was
    faster on an H200 (BENCHMARKS.md). The default is what lm_head_loss uses when not told."""
    vocab = 50257
    assert losses.chunk_elements() // vocab == 667  # this machine: a CPU
    seen = []
    real = losses._head_ce_mean
    monkeypatch.setattr(losses, "_head_ce_mean", lambda *args: seen.append(args[5]) or real(*args))
    hidden, head = jnp.ones((2, 3, 4)), jnp.ones((4, vocab)) * 0.01
    targets = jnp.zeros((2, 3), jnp.int32)
    for backend, rows in (("cpu", 667), ("gpu", (1 << 30) // vocab), ("tpu", (1 << 30) // vocab)):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        losses.lm_head_loss(hidden, head, targets, head_layout="dv")
        assert seen[-1] == rows
