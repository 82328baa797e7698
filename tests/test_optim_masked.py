"""optim.masked: the optimizer over one full parameter tree equals the split-tree path.

The split path (optim.split/merge + train.init_state/make_steps) takes gradients with respect
to the trainable tree only. optim.masked takes the whole tree and must freeze the same leaves
(bit for bit, weight decay included), keep optimizer state for the trainable leaves only, and
give the same parameters. Setup: the reference's classification recipe (AdamW lr 5e-5, weight
decay 0.1; last block + final norm + head trainable; loss on the last token) on a small
random model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import optim, steps, train
from jaxft.config import GPTConfig
from jaxft.model import init_params, param_count

CONFIG = GPTConfig(vocab_size=120, context_length=32, emb_dim=32, n_layers=3, n_heads=4, num_classes=2)
STEPS = 20


def _batches(n: int, seed: int = 0, batch: int = 8, seq: int = 20) -> list[dict[str, np.ndarray]]:
    rs = np.random.RandomState(seed)
    return [
        {
            "tokens": rs.randint(0, CONFIG.vocab_size, (batch, seq)).astype(np.int32),
            "labels": rs.randint(0, 2, batch).astype(np.int32),
            "lengths": rs.randint(1, seq + 1, batch).astype(np.int32),
            "weights": np.ones(batch, np.float32),
        }
        for _ in range(n)
    ]


def _setup(seed: int = 0):
    params = init_params(CONFIG, jax.random.PRNGKey(seed))
    # A frozen leaf holding -0.0: x + 0.0 would turn it into +0.0, so "bitwise unchanged" is
    # checked for real (wpe is frozen in the last-block recipe).
    params["wpe"]["embedding"] = params["wpe"]["embedding"].at[0, :4].set(-0.0)
    mask = optim.trainable_mask(CONFIG, params, "last-block")
    return params, mask


def _run_split(params, mask, optimizer, batches):
    """The existing path: gradients w.r.t. the trainable tree only."""
    state = train.init_state(params, mask, optimizer)
    train_step, _ = train.make_steps(CONFIG, optimizer, "classification", pooling="last")
    for batch in batches:
        state, _ = train_step(state, batch)
    return state.params, state.opt_state


def _run_masked(params, mask, optimizer, batches):
    """One full tree: gradients of every leaf, optim.masked decides what moves."""
    tx = optim.masked(optimizer, mask)

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(lambda p: steps.classification_metrics(CONFIG, "last", p, batch)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = jax.tree_util.tree_map(jnp.array, params)
    opt_state = tx.init(params)
    for batch in batches:
        params, opt_state = step(params, opt_state, batch)
    return params, opt_state


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint32)


def _max_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def _only(state, name: str):
    found = optax.tree_utils.tree_get_all_with_path(state, name)
    assert len(found) == 1, f"{len(found)} {name!r} entries in the state"
    return found[0][1]


def _array_leaves(tree) -> list[jax.Array]:
    """The arrays of a tree (optax's MaskedNode placeholders for frozen leaves are empty subtrees)."""
    return jax.tree_util.tree_leaves(tree)


def _assert_frozen_bitwise(before, after, mask) -> None:
    for path, m in jax.tree_util.tree_leaves_with_path(mask):
        if not m:
            assert np.array_equal(_bits(_at(before, path)), _bits(_at(after, path))), (
                f"frozen leaf {jax.tree_util.keystr(path)} moved"
            )


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_masked_equals_the_split_path_over_20_steps():
    params, mask = _setup()
    batches = _batches(STEPS)
    optimizer = optim.adamw(5e-5, 0.1)
    split_params, split_state = _run_split(params, mask, optimizer, batches)
    masked_params, masked_state = _run_masked(params, mask, optimizer, batches)

    diff = _max_diff(split_params, masked_params)
    print(f"\nmax |masked - split| over all parameters after {STEPS} steps: {diff:.3g}")
    assert diff <= 1e-7
    _assert_frozen_bitwise(params, masked_params, mask)
    _assert_frozen_bitwise(params, split_params, mask)
    # Not vacuous: the trainable leaves did move, by far more than the tolerance.
    trainable_before, _ = optim.split(params, mask)
    trainable_after, _ = optim.split(masked_params, mask)
    assert _max_diff(trainable_before, trainable_after) > 1e-4

    # Same Adam moments as the split path, and none for frozen leaves.
    trainable_count = param_count(trainable_before)
    for name in ("mu", "nu"):
        moments = _only(masked_state, name)
        assert sum(x.size for x in _array_leaves(moments)) == trainable_count
        assert len(_array_leaves(moments)) == sum(jax.tree_util.tree_leaves(mask))
        split_moments = _only(split_state, name)  # frozen leaves: None
        for path, m in jax.tree_util.tree_leaves_with_path(mask):
            if m:
                np.testing.assert_allclose(_at(moments, path), _at(split_moments, path), rtol=1e-6, atol=0)
            else:
                assert isinstance(_at(moments, path), optax.MaskedNode)
    state_size = sum(x.size for x in _array_leaves(masked_state))
    # mu, nu, Adam's step count, and the injected lr and weight decay with their step count: nothing more
    assert state_size == 2 * trainable_count + 4


def test_masked_with_gradient_accumulation_wraps_the_inner_optimizer():
    params, mask = _setup(seed=1)
    batches = _batches(8, seed=1)
    optimizer = optim.adamw(5e-5, 0.1, accumulation_steps=2)
    split_params, _ = _run_split(params, mask, optimizer, batches)
    masked_params, masked_state = _run_masked(params, mask, optimizer, batches)
    assert _max_diff(split_params, masked_params) <= 1e-7
    _assert_frozen_bitwise(params, masked_params, mask)
    # accumulation inside masked: its gradient accumulator covers the trainable leaves only.
    accumulated = _only(masked_state, "grads")
    assert sum(x.size for x in _array_leaves(accumulated)) == param_count(optim.split(params, mask)[0])


def test_masked_with_every_leaf_trainable_is_the_plain_optimizer():
    params, _ = _setup(seed=2)
    mask = jax.tree_util.tree_map(lambda _: True, params)
    batches = _batches(3, seed=2)
    optimizer = optim.adamw(1e-3, 0.1)

    @jax.jit
    def plain_step(params, opt_state, batch):
        grads = jax.grad(lambda p: steps.classification_metrics(CONFIG, "last", p, batch)[0])(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    plain, opt_state = jax.tree_util.tree_map(jnp.array, params), optimizer.init(params)
    for batch in batches:
        plain, opt_state = plain_step(plain, opt_state, batch)
    masked_params, _ = _run_masked(params, mask, optimizer, batches)
    assert _max_diff(plain, masked_params) <= 1e-7


def test_masked_with_every_leaf_frozen_changes_nothing():
    params, _ = _setup(seed=3)
    mask = jax.tree_util.tree_map(lambda _: False, params)
    masked_params, state = _run_masked(params, mask, optim.adamw(1e-2, 0.1), _batches(2, seed=3))
    _assert_frozen_bitwise(params, masked_params, mask)
    assert sum(x.size for x in _array_leaves(state)) == 4  # step counts (Adam's, the injected lr and decay's) and lr, decay only


def test_mask_leaves_must_be_bools():
    params, _ = _setup()
    with pytest.raises(ValueError, match="bool"):
        optim.masked(optim.adamw(), jax.tree_util.tree_map(lambda p: p, params))


def test_frozen_leaves_keep_their_bits_outside_jit_too():
    """Eagerly -0.0 + 0.0 is +0.0 (under jit XLA folds `x + 0` away); frozen updates are
    -0.0, so even a frozen -0.0 keeps its sign bit, and weight decay never reaches it."""
    params = {"frozen": jnp.array([-0.0, 0.0, 1.5, -2.0]), "trains": jnp.array([1.0, -1.0])}
    mask = {"frozen": False, "trains": True}
    tx = optim.masked(optim.adamw(0.1, 0.5), mask)
    grads = {"frozen": jnp.array([3.0, -3.0, 3.0, 3.0]), "trains": jnp.array([0.5, 0.5])}
    state = tx.init(params)
    new = params
    for _ in range(3):
        updates, state = tx.update(grads, state, new)
        new = optax.apply_updates(new, updates)
    assert np.array_equal(_bits(new["frozen"]), _bits(params["frozen"]))
    assert not np.array_equal(np.asarray(new["trains"]), np.asarray(params["trains"]))


def test_accumulate_updates_at_group_ends_epoch_ends_and_the_last_step():
    """accumulate(sgd(1), k=3) over known gradients: the update is the sum of the group's
    gradients / k, applied after every 3rd batch of an epoch, after the epoch's last batch (5 per
    epoch) and after batch `last_step` (7, a run stopped by --max-steps mid-group); nothing else moves."""

    opt = optim.accumulate(optax.sgd(1.0), 3, steps_per_epoch=5, last_step=7)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    moved = []
    for step in range(1, 8):
        updates, state = opt.update({"w": jnp.asarray(float(step))}, state, params)
        moved.append(float(updates["w"]))
    # groups: batches 1-3 (update at 3), 4-5 (epoch end at 5), 6-7 (last step 7)
    np.testing.assert_allclose(moved, [0, 0, -(1 + 2 + 3) / 3, 0, -(4 + 5) / 3, 0, -(6 + 7) / 3], rtol=1e-6)
