"""Two training settings: gradient clipping (optim.adamw(grad_clip_norm=...)) and
rematerialisation (train.make_steps(..., remat=True), model.apply(..., remat=True))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import optim, steps, train
from jaxft.config import GPTConfig
from jaxft.model import init_params

SMALL = GPTConfig(vocab_size=120, context_length=32, emb_dim=32, n_layers=2, n_heads=4)
B1 = 0.9


def _tree(seed: int, scale: float = 1.0) -> dict[str, jax.Array]:
    rs = np.random.RandomState(seed)
    return {"w": jnp.asarray(scale * rs.randn(5, 7), jnp.float32), "b": {"c": jnp.asarray(scale * rs.randn(7), jnp.float32)}}


def _effective_gradient(state: optax.OptState) -> dict:
    """The gradient Adam saw on its first step: mu = (1 - b1) g."""
    return jax.tree_util.tree_map(lambda m: m / (1 - B1), optax.tree_utils.tree_get(state, "mu"))


def _norm(tree) -> float:
    return float(optax.tree.norm(tree))


def _clip_by_hand(grads, clip: float):
    """grads scaled to global norm `clip` when their norm is larger."""
    scale = min(1.0, clip / _norm(grads))
    return jax.tree_util.tree_map(lambda g: g * scale, grads)


def _assert_close_trees(a, b, rtol: float) -> None:
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=0), a, b)


# --------------------------------------------------------------------------- grad_clip_norm


def test_grad_clip_norm_clips_a_huge_gradient_to_that_global_norm():
    params, grads = _tree(0), _tree(1, scale=1e6)  # global norm ~ 6e6
    clip = 0.5
    opt = optim.adamw(1e-3, 0.1, grad_clip_norm=clip)
    _, state = opt.update(grads, opt.init(params), params)

    seen = _effective_gradient(state)
    assert _norm(seen) == pytest.approx(clip, rel=1e-6)
    _assert_close_trees(seen, _clip_by_hand(grads, clip), rtol=1e-5)  # same direction

    # The updates are AdamW's on the clipped gradient, over several steps (Adam's first step
    # alone hardly depends on the gradient's scale; its second moment remembers it).
    plain = optax.adamw(1e-3, b1=B1, weight_decay=0.1)
    plain_state, clipped_state, unclipped_state = plain.init(params), opt.init(params), plain.init(params)
    p_hand, p_clipped, p_unclipped = params, params, params
    for step, scale in enumerate((1e6, 1.0, 1e3)):
        g = _tree(10 + step, scale)
        u_hand, plain_state = plain.update(_clip_by_hand(g, clip), plain_state, p_hand)
        u_clipped, clipped_state = opt.update(g, clipped_state, p_clipped)
        u_unclipped, unclipped_state = plain.update(g, unclipped_state, p_unclipped)
        p_hand = optax.apply_updates(p_hand, u_hand)
        p_clipped = optax.apply_updates(p_clipped, u_clipped)
        p_unclipped = optax.apply_updates(p_unclipped, u_unclipped)
    _assert_close_trees(p_clipped, p_hand, rtol=1e-6)
    assert _norm(jax.tree_util.tree_map(jnp.subtract, p_clipped, p_unclipped)) > 1e-4  # clipping mattered


def test_grad_clip_norm_leaves_a_small_gradient_alone():
    params, grads = _tree(0), _tree(2, scale=0.01)
    assert _norm(grads) < 1.0
    opt = optim.adamw(1e-3, 0.1, grad_clip_norm=1.0)
    _, state = opt.update(grads, opt.init(params), params)
    _assert_close_trees(_effective_gradient(state), grads, rtol=1e-6)


def test_grad_clip_norm_in_a_training_step():
    """Through train.make_steps: with an enormous learning signal the first step's Adam
    moment has exactly the clip norm."""
    config = SMALL.replace(num_classes=2, n_layers=1)
    params = init_params(config, jax.random.PRNGKey(0))
    mask = optim.trainable_mask(config, params, "all")
    opt = optim.adamw(5e-5, 0.1, grad_clip_norm=1e-3)
    train_step, _ = train.make_steps(config, opt, "classification")
    state, _ = train_step(train.init_state(params, mask, opt), _classification_batch(0))
    assert _norm(_effective_gradient(state.opt_state)) == pytest.approx(1e-3, rel=1e-5)


# --------------------------------------------------------------------------- remat


def _classification_batch(seed: int) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    return {
        "tokens": rs.randint(0, SMALL.vocab_size, (4, 16)).astype(np.int32),
        "labels": rs.randint(0, 2, 4).astype(np.int32),
        "lengths": rs.randint(1, 17, 4).astype(np.int32),
        "weights": np.ones(4, np.float32),
    }


def _lm_batch(seed: int) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    targets = rs.randint(0, SMALL.vocab_size, (4, 16)).astype(np.int32)
    targets[:, :3] = -100  # some ignored targets, as instruction batches have
    return {"inputs": rs.randint(0, SMALL.vocab_size, (4, 16)).astype(np.int32), "targets": targets}


TASKS = {
    "classification": (SMALL.replace(num_classes=2), _classification_batch,
                       lambda c, p, b, key, remat: steps.classification_metrics(c, "last", p, b, key, jnp.float32, remat)),
    "lm": (SMALL, _lm_batch, lambda c, p, b, key, remat: steps.lm_metrics(c, p, b, key, jnp.float32, remat)),
}


def _relative_error(a, b) -> float:
    """max over leaves of ||a - b|| / ||a||."""
    errors = jax.tree_util.tree_map(lambda x, y: float(jnp.linalg.norm(x - y) / jnp.linalg.norm(x)), a, b)
    return max(jax.tree_util.tree_leaves(errors))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_remat_gives_the_same_gradients(task):
    """With dropout on: the recomputed forward pass must replay the same dropout masks."""
    config, make_batch, metrics = TASKS[task]
    config = config.replace(drop_rate=0.1)
    params = init_params(config, jax.random.PRNGKey(1))
    batch = make_batch(1)
    key = jax.random.PRNGKey(7)

    def grads(remat: bool):
        fn = jax.grad(lambda p: metrics(config, p, batch, key, remat)[0])
        jaxpr = str(jax.make_jaxpr(fn)(params))
        assert ("remat" in jaxpr) == remat  # the flag does rematerialise (and only when set)
        return jax.jit(fn)(params)

    plain, rematerialised = grads(False), grads(True)
    assert _relative_error(plain, rematerialised) <= 1e-6


@pytest.mark.parametrize("task", sorted(TASKS))
def test_remat_train_step_matches(task):
    """train.make_steps(remat=True): the same parameters after a few steps. Plain SGD, whose
    update is linear in the gradient: Adam's first steps are nearly sign(gradient), which
    turns rounding-level differences in near-zero gradient entries into lr-sized ones."""
    config, make_batch, _ = TASKS[task]
    params = init_params(config, jax.random.PRNGKey(2))
    mask = optim.trainable_mask(config, params, "all")
    opt = optax.sgd(0.5)
    results = []
    for remat in (False, True):
        train_step, _ = train.make_steps(config, opt, task, remat=remat)
        state = train.init_state(params, mask, opt)
        for step in range(3):
            state, _ = train_step(state, make_batch(10 + step))
        results.append(state.params)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, results[0])
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3
    max_diff = max(jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), *results)))
    assert max_diff <= 1e-6


def test_bfloat16_compute_tracks_float32_training():
    """`--dtype bfloat16`: compute in bf16, parameters and optimizer state in fp32, logits,
    softmax and loss in fp32. bf16 keeps 8 significant bits (relative rounding up to 2^-8 =
    0.4% per value), but the loss averages thousands of fp32 log-probabilities and the fp32
    master weights absorb each step's rounding, so the two loss curves stay within 1% over 30
    Adam steps (measured: 8.5e-5) while a real bf16 program is visibly not the fp32 one."""
    config = GPTConfig(vocab_size=512, context_length=64, emb_dim=64, n_layers=2, n_heads=4, tie_embeddings=False)
    params = init_params(config, jax.random.key(0))
    rs = np.random.RandomState(0)
    batches = []
    for _ in range(30):
        x = (rs.randint(0, 512, (8, 1)) + np.arange(33)) % 512  # next token = this token + 1
        batches.append({"inputs": x[:, :-1].astype(np.int32), "targets": x[:, 1:].astype(np.int32)})
    curves = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        optimizer = optim.adamw(1e-3, 0.1)
        state = train.init_state(params, optim.trainable_mask(config, params, "all"), optimizer)
        step, _ = train.make_steps(config, optimizer, "lm", dtype=dtype)
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state.trainable))
        curves[dtype] = np.array(losses)
    f32, bf16 = curves[jnp.float32], curves[jnp.bfloat16]
    np.testing.assert_allclose(bf16, f32, rtol=1e-2)
    assert not np.array_equal(bf16, f32)  # the bf16 program really computed in bf16
    assert bf16[-1] < bf16[0] - 0.5  # and it learns
