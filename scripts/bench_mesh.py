#!/usr/bin/env python
"""Training-step speed and memory on a device mesh: 1 device against 8 host (CPU) devices.

One language-model train step (masked next-token loss, every parameter trainable,
AdamW) of a small GPT, timed on:

  1 device           the plain jitted step of jaxft.train.make_steps;
  data=8             8 CPU devices, batch rows split 8 ways, parameters replicated;
  fsdp=8             8 CPU devices, batch rows and the large matrices (parameters and
                     Adam's mu/nu) split 8 ways.

JAX fixes its device count at start-up, so each configuration runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N. The 8 "devices" share this machine's
cores, so this measures the overhead of the sharded program (collectives, gathers), not a
speed-up; on accelerators each device brings its own compute. The figure is the median of
--steps timed steps after one warm-up step; compile time (lower + compile) is separate.

    python scripts/bench_mesh.py                 # ~1 min on 2 cores
    python scripts/bench_mesh.py --layers 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIGS = (("1 device", 1, None), ("data=8", 8, "data=8"), ("fsdp=8", 8, "fsdp=8"))


def child(args: argparse.Namespace, spec: str | None) -> dict:
    import jax
    import numpy as np

    from jaxft import model, optim, sharding, train
    from jaxft.config import GPTConfig

    config = GPTConfig(
        vocab_size=args.vocab, context_length=args.seq, emb_dim=args.emb, n_layers=args.layers, n_heads=args.heads
    )
    params = model.init_params(config, jax.random.PRNGKey(0))
    optimizer = optim.adamw(5e-5, weight_decay=0.1)
    state = train.init_state(params, optim.trainable_mask(config, params, "all"), optimizer)
    train_step, eval_step = train.make_steps(config, optimizer, "lm")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if spec is None:
        batch = jax.device_put(host_batch)
    else:
        mesh = sharding.make_mesh(spec)
        state = sharding.shard_tree(state, mesh)
        train_step, _ = sharding.shard_steps(train_step, eval_step, mesh, state, host_batch)
        batch = sharding.global_batch(host_batch, mesh)

    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = sharding.bytes_per_device(state)
    state, metrics = compiled(state, batch)  # warm-up
    first_loss = float(metrics["loss"])
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {
        "devices": jax.device_count(),
        "params": model.param_count(params),
        "compile_s": compile_s,
        "step_s": step_s,
        "examples_per_s": args.batch / step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "bytes_per_device": max(memory.values()),
        "bytes_total": sum(x.nbytes for x in jax.tree_util.tree_leaves(state)),
        "first_loss": first_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--emb", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "1device" or a mesh spec
    args = parser.parse_args()

    if args.child is not None:
        print(json.dumps(child(args, None if args.child == "1device" else args.child)))
        return

    import platform

    print(
        f"GPT {args.layers} layers x {args.emb} (heads {args.heads}, vocab {args.vocab}), "
        f"LM step, batch {args.batch} x {args.seq} tokens, AdamW, median of {args.steps} steps; "
        f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    )
    header = f"{'mesh':<10} {'devices':>7} {'compile s':>9} {'step ms':>8} {'examples/s':>10} {'tokens/s':>9} {'MiB/device':>10} {'of total':>8}  first loss"
    print(header)
    passthrough = sys.argv[1:]
    for name, devices, spec in CONFIGS:
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
        proc = subprocess.run(
            [sys.executable, __file__, *passthrough, "--child", spec or "1device"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            sys.exit(f"{name}: {proc.stderr.strip().splitlines()[-1]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{name:<10} {r['devices']:>7} {r['compile_s']:>9.2f} {r['step_s'] * 1e3:>8.1f} "
            f"{r['examples_per_s']:>10.1f} {r['tokens_per_s']:>9.0f} {r['bytes_per_device'] / 2**20:>10.2f} "
            f"{r['bytes_per_device'] / r['bytes_total']:>8.3f}  {r['first_loss']:.6f}"
        )
    print(f"parameters: {r['params']:,}; MiB/device: parameters + Adam mu/nu + step and rng on the busiest device")


if __name__ == "__main__":
    main()
