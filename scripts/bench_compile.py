"""Train-step compile seconds and step time, scanned (--scan-layers on) and unrolled, per GPT-2 size.

    python scripts/bench_compile.py [--sizes gpt2-small,gpt2-medium,gpt2-large,gpt2-xl] [--steps 3]

The step is `finetune-instruct`'s loss (lm) with the last block trainable (what fits in host
memory for gpt2-xl: the frozen 47 blocks take no optimizer state) at batch 1 x 32 tokens, fp32.
Compiling needs shapes only (`jit(...).lower(shapes).compile()`); the step time runs on zero
weights (the time does not depend on the values). Each size runs scanned and unrolled side by
side in this one process; a JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import optim, steps
from jaxft.config import get_config
from jaxft.model import param_shapes


def measure(size: str, scan: bool, trainable: str, n_steps: int) -> dict:
    config = get_config(size)
    shapes = param_shapes(config)
    mask = optim.trainable_mask(config, shapes, trainable)
    optimizer = optim.adamw(1e-4)
    state_shapes = jax.eval_shape(lambda p: steps.init_state(p, mask, optimizer, scan_layers=scan), shapes)
    batch = {"inputs": np.zeros((1, 32), np.int32), "targets": np.ones((1, 32), np.int32)}
    train_step, _ = steps.make_steps(config, optimizer, "lm", scan_layers=scan)
    start = time.perf_counter()
    compiled = train_step.lower(state_shapes, batch).compile()
    result = {"size": size, "layers": config.n_layers, "scan": scan, "trainable": trainable, "compile_s": round(time.perf_counter() - start, 2)}
    if n_steps:
        state = steps.init_state(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), mask, optimizer, scan_layers=scan)
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(n_steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        result["step_s_median"] = round(float(np.median(times)), 4)
        result["step_s_min"] = round(float(np.min(times)), 4)
        del state
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="gpt2-small,gpt2-medium,gpt2-large,gpt2-xl")
    parser.add_argument("--trainable", default="last-block")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per program (0: compile only)")
    args = parser.parse_args()
    for size in args.sizes.split(","):
        for scan in (True, False):
            print(json.dumps(measure(size, scan, args.trainable, args.steps)), flush=True)


if __name__ == "__main__":
    main()
