"""Hyperparameter sweeps of the classification recipe in one compiled program.

K runs that differ only in learning rate, weight decay and seed train together: `jax.vmap`
over their trainable parameters, optimizer states (`optax.inject_hyperparams`, so lr and
weight decay are per-run arrays), steps and PRNG keys; the frozen parameters, the frozen
trunk cache (jaxft.trunk) and the encoded examples are shared. Every run's data live in one
pool of unique encoded rows; a run's batches are index arrays into it (its own data order,
and with the bundled data its own split), gathered inside the step, so the trunk runs once.

Each run follows `train.fit`'s schedule exactly (the same steps, evaluations, log values and
metrics as `finetune-classifier` with its settings). Runs may pad to different widths (seeded
splits, "batch"/"bucket" padding): a step computes at the widest, and each run pools where
its own width would (attention is causal, so the positions before it are unchanged).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import optim, steps
from .config import GPTConfig
from .data import batching
from .data.batching import BUCKET_MULTIPLE
from .model import Params
from .optim import merge
from .tokenizer import PAD_ID

# --sweep NAME -> (the TrainerSettings field, the value type)
SWEEPABLE = {"lr": ("lr", float), "weight-decay": ("weight_decay", float), "seed": ("seed", int)}
SPLITS = ("train", "validation", "test")


def parse_sweep(specs: Sequence[str]) -> dict[str, list]:
    """`["lr=1e-4,3e-4", "seed=1,2"]` -> {"lr": [1e-4, 3e-4], "seed": [1, 2]} (order kept)."""
    grid: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or name not in SWEEPABLE:
            raise ValueError(f"--sweep {spec!r}: expected NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)}")
        if name in grid:
            raise ValueError(f"--sweep {name} given twice: list all its values in one flag")
        kind = SWEEPABLE[name][1]
        try:
            parsed = [kind(v.strip()) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--sweep {spec!r}: values of {name} must be {kind.__name__}s") from None
        if not parsed:
            raise ValueError(f"--sweep {spec!r}: no values")
        if len(set(parsed)) != len(parsed):
            raise ValueError(f"--sweep {spec!r}: repeated values")
        grid[name] = parsed
    if not grid:
        raise ValueError("nothing to sweep: give --sweep NAME=V1,V2,... (lr, weight-decay, seed)")
    return grid


def run_name(values: dict[str, Any]) -> str:
    return "_".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}" for name, value in values.items())


def expand(recipe: Any, grid: dict[str, list]) -> list[tuple[str, dict[str, Any], Any]]:
    """(name, swept values, the run's recipe) for every combination, the first flag varying slowest."""
    runs = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        trainer = dataclasses.replace(recipe.trainer, **{SWEEPABLE[n][0]: v for n, v in values.items()})
        run_recipe = dataclasses.replace(recipe, trainer=trainer)
        run_recipe.validate(devices=False)  # a sweep runs on one device
        runs.append((run_name(values), values, run_recipe))
    return runs


# --------------------------------------------------------------------------- memory


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def run_bytes(config: GPTConfig, trainable_count: int, settings: Any, width: int, start_block: int | None) -> int:
    """A rough per-run device footprint: trainable parameters, Adam's two moments, gradients
    (and an accumulator), plus the activations a training step keeps for its backward pass."""
    states = 4 + (1 if settings.accumulation_steps > 1 else 0)
    blocks = config.n_layers - (start_block or 0)
    b, t, d = settings.batch_size, width, config.emb_dim
    per_block = b * t * (17 * d + 2 * config.n_heads * t)  # qkv, projections, MLP, norms; attention scores and weights
    if settings.remat:
        acts = b * t * d * blocks + per_block
    else:
        acts = per_block * blocks
    acts += b * t * ((config.num_classes or 2) * 2 + (0 if start_block else d))
    return 4 * (states * trainable_count + acts)


def check_memory(k: int, per_run: int, shared: int, budget_gb: float) -> None:
    """Refuse (one line) a sweep whose estimate is over the budget."""
    need = shared + k * per_run
    if need > budget_gb * 1e9:
        fits = max(0, int((budget_gb * 1e9 - shared) // per_run))
        raise ValueError(f"a sweep of {k} runs needs ~{need / 1e9:.2f} GB; the budget of {budget_gb:g} GB (--sweep-memory-gb) fits {fits} runs")


# --------------------------------------------------------------------------- the shared pool of examples


@dataclass
class RunRows:
    """One run's splits as rows of the pool: pool indices, labels, lengths cut to the run's width."""

    rows: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    width: int  # the run's padded length (its longest training text, or max_length)
    seed: int


def build_pool(datas: Sequence[Any], seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[RunRows]]:
    """(tokens [P, W], lengths [P], per-run rows): every distinct (cut) text once, padded to the
    widest run's width W with PAD_ID. A run's row equals the pool row in its first `width` tokens."""
    index: dict[tuple[int, ...], int] = {}
    keys: list[tuple[int, ...]] = []
    runs = []
    for data, seed in zip(datas, seeds):
        width = data.max_length
        rows, labels, lengths = {}, {}, {}
        for name in SPLITS:
            split = getattr(data, name)
            cut = np.minimum(split.lengths, width).astype(np.int32)
            ids = np.empty(len(split), np.int64)
            for i in range(len(split)):
                key = tuple(split.tokens[i, : cut[i]].tolist())
                if key not in index:
                    index[key] = len(keys)
                    keys.append(key)
                ids[i] = index[key]
            rows[name], labels[name], lengths[name] = ids, np.asarray(split.labels, np.int32), cut
        runs.append(RunRows(rows, labels, lengths, width, seed))
    width = max(r.width for r in runs)
    tokens = np.full((len(keys), width), PAD_ID, np.int32)
    pool_lengths = np.empty(len(keys), np.int32)
    for i, key in enumerate(keys):
        tokens[i, : len(key)] = key
        pool_lengths[i] = max(len(key), 1)
    return tokens, pool_lengths, runs


def row_widths(runs: Sequence[RunRows], n_rows: int) -> np.ndarray:
    """Per pool row, the widest padded length among the runs that use it [n_rows]: all of the row
    that "last" pooling (a run's last position, padding included) ever reads."""
    widths = np.zeros(n_rows, np.int64)
    for run in runs:
        for rows in run.rows.values():
            np.maximum.at(widths, rows, run.width)
    return widths


def batches(runs: Sequence[RunRows], split: str, batch_size: int, padding: str, *, shuffle: bool, epoch: int = 0) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Each run's batches of `split` as `ClassificationTask` makes them (same order, same cut), stacked:
    ({rows, labels, weights [K, B], eff [K]}, the step's width = the widest run's)."""
    sizes = {len(r.rows[split]) for r in runs}
    if len(sizes) != 1:
        raise ValueError(f"the runs' {split} splits differ in size ({sorted(sizes)}): they cannot share batches")
    n = sizes.pop()
    count = batching.num_batches(n, batch_size, drop_last=shuffle)
    orders = [batching.permutation(n, r.seed, epoch) if shuffle else np.arange(n) for r in runs]
    for b in range(count):
        out = {"rows": np.zeros((len(runs), batch_size), np.int32), "labels": np.zeros((len(runs), batch_size), np.int32),
               "weights": np.zeros((len(runs), batch_size), np.float32), "eff": np.zeros(len(runs), np.int32)}
        for k, (run, order) in enumerate(zip(runs, orders)):
            window = order[b * batch_size: (b + 1) * batch_size]
            m = len(window)
            out["rows"][k, :m] = run.rows[split][window]
            out["labels"][k, :m] = run.labels[split][window]
            out["weights"][k, :m] = 1.0
            width = run.width
            if padding != "longest":
                multiple = BUCKET_MULTIPLE if padding == "bucket" else 1
                width = min(-(-int(run.lengths[split][window].max()) // multiple) * multiple, run.width)
            out["eff"][k] = width
        yield out, int(out["eff"].max())


# --------------------------------------------------------------------------- the vmapped steps


class SweepState(NamedTuple):
    trainable: Params  # every leaf [K, ...]
    opt_state: optax.OptState
    step: jax.Array  # [K]
    rng: jax.Array  # [K, 2]


def sweep_optimizer(settings: Any, lr: Any, weight_decay: Any, steps_per_epoch: int | None = None) -> optax.GradientTransformation:
    """`optim.adamw` with lr and weight decay as state (`optax.inject_hyperparams`): same
    arithmetic, but one optimizer serves runs with different values (`steps_per_epoch`: see
    `optim.accumulate`, which keeps it in the state that `init` makes)."""
    opt = optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps"))(
        learning_rate=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay
    )
    if settings.grad_clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(settings.grad_clip_norm), opt)
    if settings.accumulation_steps > 1:
        opt = optim.accumulate(opt, settings.accumulation_steps, steps_per_epoch, settings.max_steps)
    return opt


def init_states(settings: Any, trainables: Sequence[Params], lrs: Sequence[float], wds: Sequence[float], seeds: Sequence[int],
                steps_per_epoch: int | None = None) -> SweepState:
    """The K runs' states stacked: what `steps.init_state` makes for each run alone."""
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trainables)
    init = jax.vmap(lambda t, lr, wd: sweep_optimizer(settings, lr, wd, steps_per_epoch).init(t))
    opt_state = init(stacked, jnp.asarray(lrs, jnp.float32), jnp.asarray(wds, jnp.float32))
    k = len(trainables)
    rng = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    return SweepState(stacked, opt_state, jnp.zeros((k,), jnp.int32), rng)


def make_sweep_steps(
    config: GPTConfig, settings: Any, pooling: str, start_block: int | None, shared: bool = False, steps_per_epoch: int | None = None
) -> tuple[Callable, Callable]:
    """jit(vmap) of `steps.make_steps`' train and eval steps:
    train_step(state, frozen, pool, batch, width) -> (state, metrics [K]) and
    eval_step(trainable, frozen, pool, batch, width) -> metrics [K]. `pool` holds the shared
    rows ("x": cached trunk output [P, W, D] or tokens [P, W]; "lengths" [P]); a batch selects
    rows per run; `width` (static) is the step's width, `eff` each run's own. `shared`: every
    run's batches are the same rows (no seed in the sweep), so the rows are gathered once and
    the first projection of the shared input is one matmul for all runs (vmap over the state
    alone)."""
    # "last" at a run's own width is "last-non-pad" with every length set to that width.
    inner = "last-non-pad" if pooling == "last" else pooling
    key = "hidden" if start_block is not None else "tokens"
    optimizer = sweep_optimizer(settings, 0.0, 0.0, steps_per_epoch)  # update reads lr/wd from the state

    def metrics(params, pool, batch, width, dropout_key, remat):
        lengths = pool["lengths"][batch["rows"]]
        lengths = jnp.full_like(lengths, batch["eff"]) if pooling == "last" else jnp.minimum(lengths, batch["eff"])
        data = {key: pool["x"][batch["rows"], :width], "labels": batch["labels"], "lengths": lengths, "weights": batch["weights"]}
        return steps.classification_metrics(config, inner, params, data, dropout_key, jnp.float32, remat, start_block=start_block)

    def train_one(state, frozen, pool, batch, width):
        dropout_key = jax.random.fold_in(state.rng, state.step)
        loss_fn = lambda t: metrics(merge(t, frozen), pool, batch, width, dropout_key, settings.remat)
        grads, m = jax.grad(loss_fn, has_aux=True)(state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return SweepState(trainable, opt_state, state.step + 1, state.rng), m

    def eval_one(trainable, frozen, pool, batch, width):
        return metrics(merge(trainable, frozen), pool, batch, width, None, False)[1]

    batch_axis = None if shared else 0
    first = (lambda batch: jax.tree_util.tree_map(lambda x: x[0], batch)) if shared else (lambda batch: batch)

    def train_step(state, frozen, pool, batch, width):
        return jax.vmap(lambda s, b: train_one(s, frozen, pool, b, width), in_axes=(0, batch_axis))(state, first(batch))

    def eval_step(trainable, frozen, pool, batch, width):
        return jax.vmap(lambda t, b: eval_one(t, frozen, pool, b, width), in_axes=(0, batch_axis))(trainable, first(batch))

    return (jax.jit(train_step, static_argnums=4, donate_argnums=0), jax.jit(eval_step, static_argnums=4))


def evaluate(eval_step: Callable, trainable: Params, frozen: Params, pool: Any, batch_iter: Iterator, num_batches: int | None = None) -> list[dict[str, float]]:
    """`steps.evaluate` for every run: the mean of per-batch losses over the first `num_batches`
    batches and the accuracy over their examples, summed in the same order."""
    k = len(jax.tree_util.tree_leaves(trainable)[0])
    loss, correct, count, n = [0.0] * k, [0.0] * k, [0.0] * k, 0
    for batch, width in batch_iter:
        if num_batches is not None and n >= num_batches:
            break
        m = jax.device_get(eval_step(trainable, frozen, pool, batch, width))
        for r in range(k):
            loss[r] += float(m["loss"][r])
            correct[r] += float(m["correct"][r])
            count[r] += float(m["count"][r])
        n += 1
    out = []
    for r in range(k):
        result = {"loss": loss[r] / n if n else math.nan}
        if count[r]:
            result["accuracy"] = correct[r] / count[r]
        out.append(result)
    return out
