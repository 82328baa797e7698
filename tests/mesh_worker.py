"""Subprocess side of tests/test_sharding.py: runs where JAX sees several (CPU) devices.

    python tests/mesh_worker.py single OUT.json
        (XLA_FLAGS=--xla_force_host_platform_device_count=8) one device vs data=8,
        data=4,fsdp=2, fsdp=8 for both tasks; bytes per device with fsdp=8; error messages.
    python tests/mesh_worker.py hosts OUT_PREFIX PROCESS_ID NUM_PROCESSES PORT
        one of NUM_PROCESSES processes (NUM_PROCESSES=1: no distributed runtime); writes
        OUT_PREFIX.json (losses, messages) and, on process 0, OUT_PREFIX.npz (final params).

The models are tiny and the runs short (5 steps), so the whole thing takes seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

STEPS = 5
BATCH = 16
SEQ = 16
LM = {"vocab_size": 256, "context_length": 32, "emb_dim": 32, "n_layers": 2, "n_heads": 4}


def setup(task: str):
    """(config, optimizer, params, mask, batches) for "lm" (every parameter trains) or
    "classification" (2 classes, last block + ln_f + head train)."""
    import jax

    from jaxft import model, optim
    from jaxft.config import GPTConfig

    rng = np.random.default_rng(0)
    if task == "lm":
        config = GPTConfig(**LM)
        trainable = "all"
    else:
        config = GPTConfig(**LM, num_classes=2)
        trainable = "last-block"
    params = model.init_params(config, jax.random.PRNGKey(0))
    mask = optim.trainable_mask(config, params, trainable)
    batches = []
    for _ in range(STEPS):
        tokens = rng.integers(0, config.vocab_size, (BATCH, SEQ), dtype=np.int32)
        if task == "lm":
            targets = np.roll(tokens, -1, axis=1)
            targets[::2, -4:] = -100  # padding of every other row is ignored
            batches.append({"inputs": tokens, "targets": targets})
        else:
            lengths = rng.integers(SEQ // 2, SEQ + 1, BATCH).astype(np.int32)
            weights = np.ones(BATCH, np.float32)
            weights[-3:] = 0.0  # padding rows
            labels = rng.integers(0, 2, BATCH).astype(np.int32)
            batches.append({"tokens": tokens, "labels": labels, "lengths": lengths, "weights": weights})
    return config, optim.adamw(1e-3, weight_decay=0.1), params, mask, batches


def run(task: str, spec: str | None):
    """Per-step losses, the eval metrics of the last batch after training, and the final
    params (NumPy) on `spec` (None: one device, make_steps's steps unchanged)."""
    import jax

    from jaxft import distributed, sharding, train

    config, optimizer, params, mask, batches = setup(task)
    state = train.init_state(params, mask, optimizer)
    train_step, eval_step = train.make_steps(config, optimizer, task)
    if spec is not None:
        mesh = sharding.make_mesh(spec)
        state = sharding.shard_tree(state, mesh)
        train_step, eval_step = sharding.shard_steps(train_step, eval_step, mesh, state, batches[0])
        rows = sharding.process_rows(BATCH, mesh)
    losses = []
    for batch in batches:
        if spec is not None:
            batch = sharding.global_batch({k: v[rows] for k, v in batch.items()}, mesh)
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    metrics = eval_step(state.params, batch)
    result = {"losses": losses, "eval": {k: float(v) for k, v in metrics.items()}}
    if spec is not None:
        want = sharding.tree_shardings(state, mesh)
        same = jax.tree_util.tree_map(lambda x, s: x.sharding == s, state, want)
        result["state_keeps_shardings"] = all(jax.tree_util.tree_leaves(same))
        result["rows"] = [rows.start, rows.stop]
    return result, distributed.gather(state.params)


def flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def max_rel_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 1e-12)) for k in b)


def message(fn) -> str | None:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the test checks the text
        return f"{type(error).__name__}: {error}"
    return None


def single(out: str) -> None:
    import jax

    from jaxft import sharding, train

    assert jax.device_count() == 8, jax.devices()
    report: dict = {"parity": {}}
    for task in ("lm", "classification"):
        base, base_params = run(task, None)
        report["parity"][task] = {"one device": base}
        for spec in ("data=8", "data=4,fsdp=2", "fsdp=8"):
            result, params = run(task, spec)
            result["params_max_rel_diff"] = max_rel_diff(flat(params), flat(base_params))
            report["parity"][task][spec] = result

    # Memory: parameters + Adam state of the LM (every leaf trains) with fsdp=8.
    config, optimizer, params, mask, batches = setup("lm")
    mesh = sharding.make_mesh("fsdp=8")
    state = sharding.shard_tree(train.init_state(params, mask, optimizer), mesh)
    train_step, _ = sharding.shard_steps(*train.make_steps(config, optimizer, "lm"), mesh, state)
    state, _ = train_step(state, sharding.global_batch(batches[0], mesh))
    leaves = jax.tree_util.tree_leaves(state)
    report["memory"] = {
        "per_device": sorted(sharding.bytes_per_device(state).values()),
        "total": sum(x.nbytes for x in leaves),
        # The rule, independently: matrices with a dimension divisible by 8 split 8 ways.
        "bound": sum(
            x.nbytes // 8 if x.ndim >= 2 and any(d % 8 == 0 for d in x.shape) else x.nbytes for x in leaves
        ),
        "replicated": sum(x.nbytes for x in leaves if x.ndim < 2),
        "specs": {k: str(s.spec) for k, s in flat_shardings(state.trainable, mesh).items()},
    }

    mesh = sharding.make_mesh("data=4,fsdp=2")
    report["errors"] = {
        "too_many": message(lambda: sharding.make_mesh("data=4,fsdp=4")),
        "too_few": message(lambda: sharding.make_mesh("data=4")),
        "batch_size": message(lambda: sharding.check_batch_size(10, mesh)),
        "global_batch": message(lambda: sharding.global_batch({"inputs": np.zeros((10, 4), np.int32)}, mesh)),
        "shard_steps": message(lambda: sharding.shard_steps(lambda s, b: None, lambda p, b: None, mesh, state, {"x": np.zeros(12)})),
    }
    Path(out).write_text(json.dumps(report, indent=1))


def flat_shardings(tree, mesh):
    from jaxft import sharding

    return flat_dict(sharding.tree_shardings(tree, mesh))


def flat_dict(tree):
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "spec"))
    return {jax.tree_util.keystr(path): x for path, x in leaves}


def hosts(prefix: str, process_id: int, num_processes: int, port: int) -> None:
    from jaxft import distributed

    report: dict = {}
    if num_processes > 1:
        distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=60)
        distributed.check_same_settings({"batch_size": BATCH, "steps": STEPS})  # agree: no error
        report["disagree"] = message(
            lambda: distributed.check_same_settings({"lr": 1e-3 * (1 + process_id), "seed": 0, "steps": STEPS})
        )
    import jax

    report["devices"] = [jax.device_count(), jax.local_device_count()]
    report["main"] = distributed.is_main_process()
    arrays = {}
    for task, spec in (("lm", "data=2,fsdp=2"), ("classification", "fsdp=4")):
        result, params = run(task, spec)
        report[task] = result
        arrays.update({f"{task}{k}": v for k, v in flat(params).items()})
    Path(f"{prefix}.{process_id}.json").write_text(json.dumps(report, indent=1))
    if process_id == 0:
        np.savez(f"{prefix}.npz", **arrays)


if __name__ == "__main__":
    if sys.argv[1] == "single":
        single(sys.argv[2])
    else:
        hosts(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
