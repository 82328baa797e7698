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


def build(size: str, scan: bool, trainable: str, run: bool, rows: int = 1, seq: int = 32) -> tuple[dict, object, object, dict]:
    """(the compile measurement, the compiled step, its state or None, the batch)."""
    config = get_config(size)
    shapes = param_shapes(config)
    mask = optim.trainable_mask(config, shapes, trainable)
    optimizer = optim.adamw(1e-4)
    state_shapes = jax.eval_shape(lambda p: steps.init_state(p, mask, optimizer, scan_layers=scan), shapes)
    batch = {"inputs": np.zeros((rows, seq), np.int32), "targets": np.ones((rows, seq), np.int32)}
    train_step, _ = steps.make_steps(config, optimizer, "lm", scan_layers=scan)
    start = time.perf_counter()
    compiled = train_step.lower(state_shapes, batch).compile()
    result = {"size": size, "layers": config.n_layers, "scan": scan, "trainable": trainable, "batch": [rows, seq], "compile_s": round(time.perf_counter() - start, 2)}
    state = None
    if run:
        zeros = lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
        state = jax.jit(lambda: steps.init_state(zeros(), mask, optimizer, scan_layers=scan))()  # one copy in memory
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
    return result, compiled, state, batch


def interleaved(programs: list, n_steps: int) -> list[list[float]]:
    """Step seconds of each program, the programs taking turns (a busy machine's slow spells hit all alike)."""
    times: list[list[float]] = [[] for _ in programs]
    for _ in range(n_steps):
        for i, program in enumerate(programs):
            compiled, state, batch = program
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times[i].append(time.perf_counter() - start)
            programs[i] = (compiled, state, batch)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="gpt2-small,gpt2-medium,gpt2-large,gpt2-xl")
    parser.add_argument("--trainable", default="last-block")
    parser.add_argument("--scan", default="both", choices=("both", "on", "off"), help="one program only (memory: gpt2-xl)")
    parser.add_argument("--batch", default="1x32", help="rows x tokens per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per program (0: compile only)")
    args = parser.parse_args()
    for size in args.sizes.split(","):
        results, programs = [], []
        for scan in {"both": (True, False), "on": (True,), "off": (False,)}[args.scan]:
            result, compiled, state, batch = build(size, scan, args.trainable, args.steps > 0, *map(int, args.batch.split("x")))
            results.append(result)
            programs.append((compiled, state, batch))
        if args.steps:
            for result, times in zip(results, interleaved(programs, args.steps)):
                result.update(step_s_median=round(float(np.median(times)), 4), step_s_min=round(float(np.min(times)), 4))
        del programs
        for result in results:
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
