"""Frozen-trunk cache vs the uncached path, side by side, on the spam recipe's shapes.

A random GPT-2 of the given size with a 2-class head, synthetic token rows of the SMS spam
splits' shapes (1045 / 149 / 300 examples, 120 tokens, batch 8), trainable last-block by
default. Times, for each path: the first step (compilation), `--steps` further steps, and for
the cached path the feature computation. An epoch is then

    uncached: steps_per_epoch * step
    cached:   steps_per_epoch * step  (+ the one-off cache: examples * seconds per example)

Measured with a subset (`--steps`, `--cache-examples`) and scaled to the full split sizes, so
it runs on a CPU in a few minutes:

    python scripts/bench_trunk.py --steps 8 --cache-examples 64          # CPU, ~3 minutes
    python scripts/bench_trunk.py --steps 130 --cache-examples 1494      # a GPU: the full thing
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from jaxft import optim, steps, trunk
from jaxft.config import get_config
from jaxft.data import batching
from jaxft.model import init_params, param_count
from jaxft.recipes import classify
from jaxft.tokenizer import PAD_ID

SPLITS = {"train": 1045, "validation": 149, "test": 300}


def _tokens(rs: np.random.RandomState, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = rs.randint(5, length + 1, n).astype(np.int32)
    tokens = np.full((n, length), PAD_ID, np.int32)
    for row, m in enumerate(lengths):
        tokens[row, :m] = rs.randint(0, 50000, m)
    return tokens, lengths


def _time_steps(train_step, state, batches: list[dict]) -> tuple[float, float, object]:
    """(first step incl. compile, mean of the rest, state)."""
    start = time.perf_counter()
    state, m = train_step(state, batches[0])
    jax.block_until_ready(m["loss"])
    first = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[1:]:
        state, m = train_step(state, batch)
    jax.block_until_ready(m["loss"])
    rest = (time.perf_counter() - start) / max(len(batches) - 1, 1)
    return first, rest, state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-small (124M)")
    p.add_argument("--trainable", default="last-block")
    p.add_argument("--length", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps after the first (compiling) one")
    p.add_argument("--cache-examples", type=int, default=64, help="examples whose features are timed (scaled to all splits)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    config = get_config(args.model)
    config, params = classify.with_classifier_head(config, init_params(config, jax.random.PRNGKey(0)), 2, jax.random.PRNGKey(1))
    mask = optim.trainable_mask(config, params, args.trainable)
    total = sum(SPLITS.values())
    rs = np.random.RandomState(0)
    n_rows = max((args.steps + 1) * args.batch_size, args.cache_examples)
    tokens, lengths = _tokens(rs, n_rows, args.length)
    arrays = {"tokens": tokens, "labels": rs.randint(0, 2, n_rows).astype(np.int32), "lengths": lengths}
    batches = list(batching.classification_batches(arrays, args.batch_size, shuffle=True, drop_last=True, seed=0, padding="longest", pad_id=PAD_ID))
    batches = batches[: args.steps + 1]
    steps_per_epoch = SPLITS["train"] // args.batch_size
    plan = trunk.plan(config, mask, enabled=True, rows=total, seq=args.length, max_bytes=64e9)
    print(f"{config.name}: {param_count(params):,} parameters; trainable {args.trainable}; {jax.default_backend()} ({jax.devices()[0].device_kind})")
    print(f"cache plan: {plan.reason}; {trunk.gigabytes(plan.bytes)} for all {total} examples")
    opt = optim.adamw(5e-5, 0.1)

    # Uncached.
    train_step, _ = steps.make_steps(config, opt, "classification")
    state = steps.init_state(params, mask, opt)
    u_first, u_step, _ = _time_steps(train_step, state, batches)

    # Cached: features for `cache_examples` rows (timed, scaled), then the suffix steps.
    start = time.perf_counter()
    hidden = trunk.trunk_features(config, params, tokens[: args.cache_examples], plan.start_block, batch_size=args.batch_size)
    # the training batches' rows: the same examples (features of rows beyond cache_examples too)
    per_example = (time.perf_counter() - start) / args.cache_examples
    if n_rows > args.cache_examples:
        hidden = np.concatenate([hidden, trunk.trunk_features(config, params, tokens[args.cache_examples :], plan.start_block, batch_size=args.batch_size)])
    cached_arrays = {"hidden": hidden, "labels": arrays["labels"], "lengths": lengths}
    c_batches = list(batching.classification_batches(cached_arrays, args.batch_size, shuffle=True, drop_last=True, seed=0, padding="longest", pad_id=PAD_ID))
    c_batches = c_batches[: args.steps + 1]
    train_step_c, _ = steps.make_steps(config, opt, "classification", start_block=plan.start_block)
    state = steps.init_state(params, mask, opt)
    c_first, c_step, _ = _time_steps(train_step_c, state, c_batches)

    cache_all = per_example * total
    result = {
        "model": config.name, "trainable": args.trainable, "backend": jax.default_backend(), "start_block": plan.start_block,
        "steps_timed": args.steps, "steps_per_epoch": steps_per_epoch, "cache_examples_timed": args.cache_examples,
        "uncached": {"first_step_s": u_first, "step_s": u_step, "epoch_s": steps_per_epoch * u_step},
        "cached": {"first_step_s": c_first, "step_s": c_step, "epoch_s": steps_per_epoch * c_step,
                   "cache_s_per_example": per_example, "cache_all_splits_s": cache_all, "cache_bytes": plan.bytes},
    }
    print(f"{'':10s}{'first step':>12s}{'step':>10s}{'epoch (' + str(steps_per_epoch) + ' steps)':>22s}{'one-off cache':>16s}")
    print(f"{'uncached':10s}{u_first:11.2f}s{u_step:9.3f}s{steps_per_epoch * u_step:21.1f}s{'-':>16s}")
    print(f"{'cached':10s}{c_first:11.2f}s{c_step:9.3f}s{steps_per_epoch * c_step:21.1f}s{cache_all:15.1f}s")
    print(f"5 epochs (the recipe): uncached {5 * steps_per_epoch * u_step:.0f} s, cached {5 * steps_per_epoch * c_step + cache_all:.0f} s "
          f"(step speed-up x{u_step / c_step:.1f}); evaluations not included")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
