"""Scanned blocks (--scan-layers): the stacked layout is an exact inverse of the public one,
and scanned programs give the unrolled programs' losses (within 1e-6), also with remat,
dropout, LoRA, the trunk cache, generation and on an 8-device mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import generate, lora, model, optim, sharding, stacking, steps, trunk
from jaxft.config import GPTConfig

CONFIG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_layers=5, n_heads=4)
CLASSIFIER = CONFIG.replace(num_classes=3)
TOL = 1e-6


def _params(config: GPTConfig, seed: int = 0):
    return model.init_params(config, seed)


def _cls_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, 97, (4, 12), dtype=np.int32), "labels": rng.integers(0, 3, 4, dtype=np.int32),
            "lengths": np.array([12, 5, 9, 1], np.int32)}


def _lm_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 97, (4, 12), dtype=np.int32)
    targets[:, :3] = -100
    return {"inputs": rng.integers(0, 97, (4, 12), dtype=np.int32), "targets": targets}


def test_stack_unstack_is_an_exact_inverse():
    params = _params(CONFIG)
    mask = optim.trainable_mask(CONFIG, params, "last-2-blocks")
    runs = stacking.block_runs(CONFIG.n_layers, mask)
    assert runs == [(0, 3)]  # h_0..h_2 frozen; h_3 trains alone; the last block stays its own
    stacked = stacking.stack(params, runs)
    assert "h_0-2" in stacked and "h_0" not in stacked and stacked["h_0-2"]["mlp"]["c_fc"]["kernel"].shape == (3, 32, 128)
    back = stacking.unstack(stacked)
    assert list(back) == list(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    # a state stacked once gives the public layout back, bitwise
    state = steps.init_state(params, mask, optim.adamw(1e-3), scan_layers=True)
    assert "h_0-2" in state.frozen and "h_0" not in state.trainable
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, params)
    assert stacking.block_runs(5, optim.trainable_mask(CONFIG, params, "all")) == [(0, 4)]
    assert stacking.block_runs(2) == []


def test_resolve():
    assert stacking.resolve("auto", "cpu") and not stacking.resolve("auto", "gpu") and not stacking.resolve("auto", "tpu")
    assert not stacking.resolve("auto", "cpu", generation=True)
    assert stacking.resolve("on") and not stacking.resolve("off") and stacking.resolve(True)
    with pytest.raises(ValueError, match="unknown scan_layers 'yes'"):
        stacking.resolve("yes")


@pytest.mark.parametrize("kwargs", [{}, {"pool_index": jnp.array([11, 4, 8, 0])}, {"return_hidden": True}])
def test_apply_scanned_equals_unrolled(kwargs):
    params = _params(CLASSIFIER if "pool_index" in kwargs else CONFIG)
    config = CLASSIFIER if "pool_index" in kwargs else CONFIG
    tokens = _cls_batch()["tokens"]
    unrolled = model.apply(config, params, tokens, **kwargs)
    scanned = model.apply(config, params, tokens, scan_layers=True, **kwargs)
    stacked = model.apply(config, stacking.stack(params, [(0, 4)]), tokens, **kwargs)  # a stacked tree scans anyway
    np.testing.assert_allclose(scanned, unrolled, atol=TOL, rtol=0)
    np.testing.assert_allclose(stacked, unrolled, atol=TOL, rtol=0)


def _losses(config, params, task, trainable, scan, n=3, batch=None, **options):
    mask = optim.trainable_mask(config, params, trainable)
    # SGD with momentum (a state per leaf, stacked with it): Adam's first steps are about lr * sign(g),
    # so the rounding noise of tiny gradients (the key bias's is zero in exact arithmetic) would
    # become lr-sized steps in one program and not the other
    optimizer = optax.sgd(0.05, momentum=0.9)
    state = steps.init_state(params, mask, optimizer, seed=1, scan_layers=scan)
    train_step, eval_step = steps.make_steps(config, optimizer, task, scan_layers=scan, **options)
    batch = batch or (_cls_batch() if task == "classification" else _lm_batch())
    out = []
    for _ in range(n):
        state, metrics = train_step(state, batch)
        out.append(float(metrics["loss"]))
    out.append(float(eval_step(state.params, batch)["loss"]))
    return np.array(out), state.params


@pytest.mark.parametrize("trainable,options", [
    ("last-2-blocks", {}), ("all", {"remat": True}), ("all", {"pooling": "mean"}), ("last-block", {"pooling": "last-non-pad"}),
])
def test_classification_steps_scanned_equal_unrolled(trainable, options):
    params = _params(CLASSIFIER)
    unrolled, _ = _losses(CLASSIFIER, params, "classification", trainable, False, **options)
    scanned, _ = _losses(CLASSIFIER, params, "classification", trainable, True, **options)
    np.testing.assert_allclose(scanned, unrolled, atol=TOL, rtol=0)


@pytest.mark.parametrize("config_change,trainable,remat", [({}, "all", False), ({}, "last-block", True), ({"drop_rate": 0.2}, "all", True)])
def test_lm_steps_scanned_equal_unrolled(config_change, trainable, remat):
    config = CONFIG.replace(**config_change)
    params = _params(CONFIG)
    unrolled, _ = _losses(config, params, "lm", trainable, False, remat=remat)
    scanned, _ = _losses(config, params, "lm", trainable, True, remat=remat)
    np.testing.assert_allclose(scanned, unrolled, atol=TOL, rtol=0)


def test_lora_steps_scanned_equal_unrolled():
    config, params = lora.add_lora(CONFIG, _params(CONFIG), 4, 8.0, jax.random.PRNGKey(2))
    unrolled, _ = _losses(config, params, "lm", "lora", False)
    scanned, _ = _losses(config, params, "lm", "lora", True)
    np.testing.assert_allclose(scanned, unrolled, atol=TOL, rtol=0)


def test_trunk_cache_scanned_equals_unrolled():
    params = _params(CLASSIFIER)
    tokens = _cls_batch()["tokens"]
    unrolled = trunk.trunk_features(CLASSIFIER, params, tokens, 4)
    scanned = trunk.trunk_features(CLASSIFIER, params, tokens, 4, scan_layers=True)
    np.testing.assert_allclose(scanned, unrolled, atol=TOL, rtol=0)
    # the suffix from block 3 of 5 (last-2-blocks): two blocks, the pooled last one apart
    batch = {**_cls_batch(), "hidden": trunk.trunk_features(CLASSIFIER, params, tokens, 3)}
    del batch["tokens"]
    unrolled_l, _ = _losses(CLASSIFIER, params, "classification", "last-2-blocks", False, batch=batch, start_block=3)
    scanned_l, _ = _losses(CLASSIFIER, params, "classification", "last-2-blocks", True, batch=batch, start_block=3)
    np.testing.assert_allclose(scanned_l, unrolled_l, atol=TOL, rtol=0)


def test_generation_scanned_equals_unrolled():
    params = _params(CONFIG)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9]]
    unrolled = generate.generate(CONFIG, params, prompts, max_new_tokens=6, eos_id=None)
    scanned = generate.generate(CONFIG, params, prompts, max_new_tokens=6, eos_id=None, scan_layers="on")
    assert scanned == unrolled and len(unrolled[0]) == 6


def test_stacked_leaves_keep_the_layer_axis_whole():
    mesh = sharding.make_mesh("data=1,fsdp=1")
    stacked = jax.eval_shape(lambda: stacking.stack(_params(CONFIG), [(0, 4)]))
    specs = jax.tree_util.tree_map(lambda s: s.spec, sharding.tree_shardings(stacked, mesh))
    assert specs["h_0-3"]["mlp"]["c_fc"]["kernel"] == jax.sharding.PartitionSpec(None)
    fsdp_spec = jax.tree_util.tree_map_with_path(
        lambda path, x: sharding.leaf_spec(x.shape[1:], 4) if stacking.is_stacked_path(path) else None, stacked
    )
    assert fsdp_spec["h_0-3"]["mlp"]["c_fc"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp")


_MESH_SCRIPT = textwrap.dedent('''
    import json, jax, numpy as np, optax
    from jaxft import model, optim, sharding, steps
    from jaxft.config import GPTConfig
    config = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_layers=5, n_heads=4, num_classes=3)
    params = model.init_params(config, 0)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 97, (8, 12), dtype=np.int32), "labels": rng.integers(0, 3, 8, dtype=np.int32)}
    out = {}
    for scan in (False, True):
        mesh = sharding.make_mesh("data=4,fsdp=2")
        optimizer = optax.sgd(0.05, momentum=0.9)
        state = steps.init_state(params, optim.trainable_mask(config, params, "all"), optimizer, scan_layers=scan)
        train, ev = steps.make_steps(config, optimizer, "classification", scan_layers=scan, remat=True)
        state = sharding.shard_tree(state, mesh)
        train, ev = sharding.shard_steps(train, ev, mesh, state)
        losses = []
        for _ in range(3):
            state, m = train(state, sharding.global_batch(batch, mesh))
            losses.append(float(m["loss"]))
        out[str(scan)] = losses
    print(json.dumps(out))
''')


def test_mesh_steps_scanned_equal_unrolled():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    done = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["True"], out["False"], atol=TOL, rtol=0)
    assert out["True"][0] > out["True"][-1]  # it trained
