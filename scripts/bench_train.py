#!/usr/bin/env python
"""Training-step speed: jaxft's jitted steps against the PyTorch reference, same run, same weights.

Two steps, each timed in jaxft and in a torch loop written like the reference's:

1. classification (the reference's SMS-spam recipe): batch 8 x 120 tokens, a new 2-class head,
   only the head + final LayerNorm + last block trainable, AdamW(5e-5, weight decay 0.1),
   cross-entropy on the last position's logits;
2. instruction tuning: masked next-token loss (targets -100 are ignored; the last 16
   positions of every other row are padding), every parameter trainable, batch 8 x
   --lm-seq tokens (default 128), AdamW(5e-5, weight decay 0.1). Both frameworks use the
   reference's layout: a separate (untied) output head, as in the reference's GPTModel.

Both models hold the same random weights (jaxft's init, exported with
`params_to_state_dict`) and see the same batch; the first-step losses are printed side by
side as a check that the two compute the same thing. Steps are interleaved (jaxft, torch,
jaxft, ...) so background load hits both alike; the figure is the median of --steps timed
steps after one warm-up step. jaxft's compile time is measured separately (lower+compile).

    python scripts/bench_train.py                     # gpt2-small, ~1.5 min on 2 quiet cores
    python scripts/bench_train.py --layers 2 --steps 3  # quick
    python scripts/bench_train.py --skip-cls --lm-steps 5  # the instruction (LM) step only
    python scripts/bench_train.py --skip-cls --breakdown 3  # and its pieces: forward, backward, head, update
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests"):  # jaxft without installing it; the reference's GPTModel
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def _early_threads(argv: list[str]) -> None:
    """--threads N pins the process to N cores before jax and torch start their pools.

    XLA's CPU thread pool sizes itself from the CPU affinity mask, so pinning gives both
    frameworks the same number of cores; torch also gets set_num_threads(N) in main()."""
    if "--threads" in argv:
        n = int(argv[argv.index("--threads") + 1])
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])


if __name__ == "__main__":
    _early_threads(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jaxft import optim, train  # noqa: E402
from jaxft.config import GPTConfig, get_config, is_size_name  # noqa: E402
from jaxft.model import init_params, param_count  # noqa: E402
from jaxft.recipes.classify import with_classifier_head  # noqa: E402
from jaxft.weights.torch_ref import params_to_state_dict  # noqa: E402

LR, WEIGHT_DECAY = 5e-5, 0.1  # the reference's AdamW settings for both recipes
NUM_CLASSES = 2
IGNORE = -100

Params = dict[str, Any]


# --------------------------------------------------------------------------- models and batches


def parse_size(name: str, layers: int | None = None) -> GPTConfig:
    """A GPT-2 size name or EMBxLAYERSxHEADS (GPT-2's vocabulary and context); --layers overrides the depth."""
    if is_size_name(name):
        config = get_config(name)
    else:
        try:
            emb, n_layers, heads = (int(x) for x in name.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--size {name!r}: use a GPT-2 size (gpt2-small, ...) or EMBxLAYERSxHEADS, e.g. 384x6x6")
        config = GPTConfig(emb_dim=emb, n_layers=n_layers, n_heads=heads, name=name)
    if layers is not None:
        config = config.replace(n_layers=layers, name=f"{config.name}, {layers} layers")
    return config


def classifier_params(config: GPTConfig, seed: int) -> tuple[GPTConfig, Params]:
    """Random GPT-2 params with the recipe's torch-style 2-class head."""
    params = init_params(config, jax.random.key(seed))
    return with_classifier_head(config, params, NUM_CLASSES, jax.random.key(seed + 1))


def lm_params(config: GPTConfig, seed: int) -> tuple[GPTConfig, Params]:
    """Random params in the reference's layout: an untied `lm_head` (the reference's `out_head`)."""
    config = config.replace(tie_embeddings=False)
    return config, init_params(config, jax.random.key(seed))


def classification_batch(config: GPTConfig, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Token rows of random lengths padded with 50256 to `seq` (the reference pads to the longest text), labels 0/1."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq // 4, seq + 1, batch).astype(np.int32)
    lengths[0] = seq
    pad = min(50256, config.vocab_size - 1)  # GPT-2's <|endoftext|>, or the last id of a small test vocabulary
    tokens = np.full((batch, seq), pad, np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(0, min(config.vocab_size, 50256), n)
    return {
        "tokens": tokens,
        "labels": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
        "lengths": lengths,
        "weights": np.ones(batch, np.float32),
    }


def lm_batch(config: GPTConfig, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """inputs/targets shifted by one; every other row ends in 16 padding targets (-100)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(config.vocab_size, 50256), (batch, seq + 1)).astype(np.int32)
    targets = ids[:, 1:].copy()
    targets[1::2, -min(16, seq - 1) :] = IGNORE
    return {"inputs": ids[:, :-1], "targets": targets}


def reference_model(config: GPTConfig, params: Params, device: str) -> torch.nn.Module:
    """The reference's GPTModel holding `params` (a classifier gets the reference's Linear head with bias)."""
    from reference_gpt import GPTModel, config_dict

    model = GPTModel(config_dict(config))
    if config.num_classes is not None:
        model.out_head = torch.nn.Linear(config.emb_dim, config.num_classes)
    state = {k: torch.from_numpy(np.array(v)) for k, v in params_to_state_dict(config, params).items()}
    model.load_state_dict(state)
    return model.to(device).train()


# --------------------------------------------------------------------------- step runners


def sync_all(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Runner:
    """A stateful zero-argument step: each call trains one step and returns once it is done."""

    name: str
    step: Callable[[], float]  # returns the step's loss (a float; reading it is after the sync)
    compile_s: float | None = None


def jaxft_runner(
    name: str, config: GPTConfig, params: Params, batch: dict, task: str, trainable: str, dtype: Any = jnp.float32
) -> Runner:
    """jaxft's jitted train step, compiled ahead of time (the compile is timed on its own)."""
    opt = optim.adamw(LR, WEIGHT_DECAY)
    mask = optim.trainable_mask(config, params, trainable)
    state = train.init_state(params, mask, opt)
    train_step, _ = train.make_steps(config, opt, task, pooling="last", dtype=dtype)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    start = time.perf_counter()
    compiled = train_step.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - start
    cell = [state]

    def step() -> float:
        # The host batch goes in as NumPy, as in the training loop (the transfer is timed).
        new_state, metrics = compiled(cell[0], batch)
        jax.block_until_ready((new_state, metrics))
        cell[0] = new_state
        return metrics["loss"]

    return Runner(name, step, compile_s)


def torch_runner(
    name: str, config: GPTConfig, params: Params, batch: dict, task: str, trainable: str, device: str,
    autocast: torch.dtype | None = None,
) -> Runner:
    """The reference's torch step: requires_grad on the trainable parts, AdamW over model.parameters()."""
    model = reference_model(config, params, device)
    if trainable == "last-block":  # the reference's classification recipe
        for p in model.parameters():
            p.requires_grad = False
        for module in (model.trf_blocks[-1], model.final_norm, model.out_head):
            for p in module.parameters():
                p.requires_grad = True
    elif trainable != "all":
        raise ValueError(f"torch runner: trainable {trainable!r} not supported")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    if task == "classification":
        x = torch.from_numpy(batch["tokens"].astype(np.int64)).to(device)
        y = torch.from_numpy(batch["labels"].astype(np.int64)).to(device)

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(model(x)[:, -1, :], y)

    else:
        x = torch.from_numpy(batch["inputs"].astype(np.int64)).to(device)
        y = torch.from_numpy(batch["targets"].astype(np.int64)).to(device)

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    device_type = device.split(":")[0]

    def step() -> float:
        optimizer.zero_grad()
        if autocast is None:
            loss = loss_fn()
        else:
            with torch.autocast(device_type, dtype=autocast):
                loss = loss_fn()
        loss.backward()
        optimizer.step()
        sync_all(device)
        return loss.detach()

    return Runner(name, step)


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (spin-waiting threads count too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_runners(runners: list[Runner], steps: int, budget_s: float | None = None) -> dict[str, dict]:
    """One warm-up step each, then up to `steps` interleaved timed steps per runner.

    Stops early (after at least 2 timed rounds) once `budget_s` seconds have passed.
    Returns per runner: times (s, wall), cpu (s, process CPU time), first_loss (the warm-up
    step's), last_loss. With --threads 1 the CPU time is the step's work, much less
    sensitive than the wall time to other processes on a shared machine."""
    results = {r.name: {"times": [], "cpu": [], "first_loss": float(r.step())} for r in runners}
    start = time.perf_counter()
    for i in range(steps):
        for r in runners:
            c0, t0 = _cpu_seconds(), time.perf_counter()
            loss = r.step()
            results[r.name]["times"].append(time.perf_counter() - t0)
            results[r.name]["cpu"].append(_cpu_seconds() - c0)
            results[r.name]["last_loss"] = float(loss)
        if budget_s is not None and i >= 1 and time.perf_counter() - start > budget_s:
            break
    for r in runners:
        results[r.name]["median_ms"] = 1e3 * statistics.median(results[r.name]["times"])
        results[r.name]["compile_s"] = r.compile_s
    return results


# --------------------------------------------------------------------------- LM step breakdown


def lm_breakdown(config: GPTConfig, params: Params, batch: dict, repeats: int) -> list[tuple[str, float, float]]:
    """Where the instruction step's time goes: its pieces timed apart, jaxft and torch interleaved.

    Returns (piece, best jaxft s, best torch s) for: forward + loss; forward + backward (the
    gradients, no update); the LM head + cross-entropy alone, forward + backward, from
    given final-norm hidden states; the AdamW update alone. The blocks' share is the
    difference of the second and the third."""
    from jaxft import losses, model, steps

    targets = batch["targets"]
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_fn(p, b):
        return steps.lm_metrics(config, p, b)[0]

    def head_loss(h, w):
        return losses.lm_head_loss(h, w, jbatch["targets"], head_layout="dv")[0]

    jparams = jax.tree_util.tree_map(jnp.asarray, params)
    hidden = jax.jit(lambda p, x: model.apply(config, p, x, return_hidden=True))(jparams, jbatch["inputs"])
    grads = jax.jit(jax.grad(loss_fn))(jparams, jbatch)
    opt = optim.adamw(LR, WEIGHT_DECAY)
    opt_state = opt.init(jparams)

    def update(g, s, p):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    jax_pieces = {
        "forward + loss": (jax.jit(loss_fn), (jparams, jbatch)),
        "forward + backward": (jax.jit(jax.grad(loss_fn)), (jparams, jbatch)),
        "head + cross-entropy, forward + backward": (jax.jit(jax.grad(head_loss, argnums=(0, 1))), (hidden, jparams["lm_head"]["kernel"])),
        "AdamW update": (jax.jit(update), (grads, opt_state, jparams)),
    }
    compiled = {k: f.lower(*a).compile() for k, (f, a) in jax_pieces.items()}

    tmodel = reference_model(config, params, "cpu")
    optimizer = torch.optim.AdamW(tmodel.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    x = torch.from_numpy(batch["inputs"].astype(np.int64))
    y = torch.from_numpy(targets.astype(np.int64)).flatten()
    t_hidden = torch.from_numpy(np.array(hidden))

    def t_forward():
        with torch.no_grad():
            F.cross_entropy(tmodel(x).flatten(0, 1), y)

    def t_backward():
        tmodel.zero_grad()
        F.cross_entropy(tmodel(x).flatten(0, 1), y).backward()

    def t_head():
        h = t_hidden.clone().requires_grad_()
        tmodel.out_head.weight.grad = None
        F.cross_entropy(tmodel.out_head(h).flatten(0, 1), y).backward()

    t_backward()  # gradients in place for the update
    torch_pieces = {"forward + loss": t_forward, "forward + backward": t_backward,
                    "head + cross-entropy, forward + backward": t_head, "AdamW update": optimizer.step}
    best = {k: [float("inf"), float("inf")] for k in jax_pieces}
    for k in jax_pieces:  # warm-up
        jax.block_until_ready(compiled[k](*jax_pieces[k][1]))
        torch_pieces[k]()
    for _ in range(repeats):
        for k in jax_pieces:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[k](*jax_pieces[k][1]))
            best[k][0] = min(best[k][0], time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch_pieces[k]()
            best[k][1] = min(best[k][1], time.perf_counter() - t0)
    return [(k, *v) for k, v in best.items()]


# --------------------------------------------------------------------------- reporting


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def bench_pair(label: str, config: GPTConfig, params: Params, batch: dict, task: str, trainable: str,
               steps: int, device: str = "cpu") -> tuple[dict, list[tuple]]:
    """jaxft vs torch for one step kind; returns (raw results, table rows)."""
    runners = [
        jaxft_runner("jaxft", config, params, batch, task, trainable),
        torch_runner("torch", config, params, batch, task, trainable, device),
    ]
    r = time_runners(runners, steps)
    j, t = r["jaxft"], r["torch"]
    print(f"{label}: jaxft {j['median_ms']:.0f} ms/step (compile {j['compile_s']:.1f} s), torch {t['median_ms']:.0f} ms/step; "
          f"first-step loss jaxft {j['first_loss']:.6f} torch {t['first_loss']:.6f} "
          f"(|diff| {abs(j['first_loss'] - t['first_loss']):.1e}); steps timed {len(j['times'])}")
    print("  jaxft steps (ms): " + ", ".join(f"{1e3 * s:.0f}" for s in j["times"]))
    print("  torch steps (ms): " + ", ".join(f"{1e3 * s:.0f}" for s in t["times"]))
    cpu_j, cpu_t = statistics.median(j["cpu"]), statistics.median(t["cpu"])
    print(f"  process CPU s/step (median): jaxft {cpu_j:.2f}, torch {cpu_t:.2f} ({cpu_t / cpu_j:.2f}x)")
    best_j, best_t = 1e3 * min(j["times"]), 1e3 * min(t["times"])
    row = (label, f"{j['median_ms']:.0f}", f"{t['median_ms']:.0f}", f"{t['median_ms'] / j['median_ms']:.2f}x",
           f"{best_j:.0f} / {best_t:.0f} ({best_t / best_j:.2f}x)", f"{j['compile_s']:.1f}")
    return r, [row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="gpt2-small", help="GPT-2 size name or EMBxLAYERSxHEADS (default gpt2-small)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (a quicker run)")
    parser.add_argument("--steps", type=int, default=5, help="timed classification steps per framework (after 1 warm-up)")
    parser.add_argument("--lm-steps", type=int, default=3, help="timed instruction steps per framework (after 1 warm-up)")
    parser.add_argument("--cls-seq", type=int, default=120, help="classification tokens per row (the reference's: 120)")
    parser.add_argument("--lm-seq", type=int, default=128, help="instruction-tuning tokens per row")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None,
                        help="pin the process to N cores (XLA sizes its pool from the affinity) and torch.set_num_threads(N)")
    parser.add_argument("--skip-lm", action="store_true", help="time the classification step only")
    parser.add_argument("--skip-cls", action="store_true", help="time the instruction (LM) step only")
    parser.add_argument("--breakdown", type=int, default=0, metavar="N",
                        help="also time the LM step's pieces (forward, backward, head, update), best of N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    config = parse_size(args.size, args.layers)
    cores = len(os.sched_getaffinity(0))
    print(f"# jaxft training-step benchmark {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores ({platform.machine()}); process pinned to {cores} core(s)")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), XLA CPU pool sized "
          f"from the affinity mask ({cores} cores); torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}; fp32")
    print(f"load average (1/5/15 min) at start: {load_average()}")
    print(f"model: {config.name}: {config.emb_dim} wide, {config.n_layers} layers, {config.n_heads} heads, "
          f"vocab {config.vocab_size}, context {config.context_length}")
    rows = []

    if not args.skip_cls:
        cls_config, params = classifier_params(config, args.seed)
        mask = optim.trainable_mask(cls_config, params, "last-block")
        n_train = param_count(optim.split(params, mask)[0])
        label = f"classification, batch {args.batch_size}x{args.cls_seq}, last block+norm+head ({n_train / 1e6:.1f}M of {param_count(params) / 1e6:.0f}M trainable)"
        batch = classification_batch(cls_config, args.batch_size, args.cls_seq, args.seed)
        _, new_rows = bench_pair(label, cls_config, params, batch, "classification", "last-block", args.steps)
        rows += new_rows
        del params

    if not args.skip_lm:
        lm_config, params = lm_params(config, args.seed)
        label = (f"instruction (masked LM), batch {args.batch_size}x{args.lm_seq}, all "
                 f"{param_count(params) / 1e6:.0f}M trainable (untied head)")
        batch = lm_batch(lm_config, args.batch_size, args.lm_seq, args.seed)
        _, new_rows = bench_pair(label, lm_config, params, batch, "lm", "all", args.lm_steps)
        rows += new_rows
        if args.breakdown:
            pieces = lm_breakdown(lm_config, params, batch, args.breakdown)
            print(f"\nwhere the instruction step's time goes (best of {args.breakdown}, interleaved):")
            print("| piece | jaxft ms | torch ms | jaxft speed-up |\n|---|---|---|---|")
            for name, tj, tt in pieces:
                print(f"| {name} | {1e3 * tj:.0f} | {1e3 * tt:.0f} | {tt / tj:.2f}x |")

    print(f"load average (1/5/15 min) at end: {load_average()}")
    print("\n| step | jaxft ms/step (median) | torch ms/step (median) | jaxft speed-up | best jaxft / torch ms | jaxft compile s |"
          "\n|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
