"""`run_sweep`: the classification recipe for K settings at once (see jaxft.sweep), and its outputs:
OUT/runs/<name>/ as `finetune-classifier` writes OUT/ (metrics.json with the same keys, the
run's own settings under "recipe"; plots; model/ unless turned off), OUT/summary.csv, and
OUT/sweep-plot.{png,pdf} (validation loss and accuracy per setting), OUT/sweep.json (the
sweep itself: grid, per-step losses of every run, memory estimate, timings)."""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from . import optim, train, trunk, weights
from .data import spam
from .fileio import atomic_file, write_json
from .lora import add_lora
from .plots import new_figure, plot_values, save_figure
from .recipes.classify import ClassifierRecipe, Classifier, check_data_vocabulary, encode_splits, load_frames, with_classifier_head
from .recipes.common import resolve_model
from .timing import Timing
from .sweep import SPLITS, batches, build_pool, check_memory, evaluate, expand, init_states, make_sweep_steps, row_widths, run_bytes, _count


def _trunk_by_width(
    config, params, tokens: np.ndarray, n_blocks: int, widths: np.ndarray, batch_size: int, progress: bool | None = None
) -> tuple[np.ndarray, int]:
    """`trunk.trunk_pass` for rows read up to different long widths (seeds whose training texts
    pad to 120, 139 or 216 tokens): each width's rows computed at that width (one compiled shape
    per width), zeros after it. Such widths do not pack (two rarely fit in one row of the widest)."""
    out = np.zeros((*tokens.shape, config.emb_dim), np.float32)
    total = 0
    for width in np.unique(widths):
        rows = np.flatnonzero(widths == width)
        out[rows, :width], positions = trunk.trunk_pass(
            config, params, tokens[rows, :width], n_blocks, batch_size=batch_size, progress=progress, desc=f"trunk features ({width} positions)"
        )
        total += positions
    return out, total


SEED_WITH_RANDOM_INIT = (
    "cannot sweep seed with --init random: the seed also draws the random model, so the runs would share no frozen trunk; "
    "save one random model (jaxft.export(config, params, DIR, 'jaxft')) and sweep it with --model DIR --init pretrained"
)


def run_sweep(
    recipe: ClassifierRecipe,
    grid: dict[str, list],
    out_dir: str | Path,
    tokenizer: Any,
    *,
    frames: Any = None,
    class_names: Sequence[str] | None = None,
    memory_gb: float = 8.0,
    save_models: bool = True,
    log: Callable[[str], None] = print,
    claim: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Train every combination of `grid` ({"lr"|"weight-decay"|"seed": values}) over `recipe`,
    each run as `recipes.classify.run` would alone, in one vmapped program. `frames`/`class_names`
    as `classify.run` takes them (default: `load_frames` of each run's recipe, i.e. the bundled
    data split by each run's seed). Returns {"runs": {name: metrics}, "step_losses": {name: [..]}, ...}."""
    started, timing = time.perf_counter(), Timing()  # one clock for the K runs (each metrics.json gets its timing)
    out_dir = Path(out_dir)
    recipe.validate(devices=False)  # one device, whatever the host has
    runs = expand(recipe, grid)
    settings = recipe.trainer
    k = len(runs)
    if recipe.trainer.init == "random" and len(grid.get("seed", [])) > 1:
        raise ValueError(SEED_WITH_RANDOM_INIT)
    if settings.mesh is not None or settings.dtype != "float32":
        raise ValueError("a sweep runs its K runs as one float32 program on one device: drop --mesh and --dtype")

    # Data: the given frames (or --train/--validation/--test) for every run; one split per seed when split from one file.
    split_here = False
    if frames is None:
        frames, class_names, split_here = load_frames(runs[0][2])
    by_seed = {runs[0][2].trainer.seed: frames}
    for _, _, r in runs:
        if r.trainer.seed not in by_seed:
            by_seed[r.trainer.seed] = load_frames(r)[0] if split_here else frames
    n_train = len(next(iter(by_seed.values()))[0])
    if settings.batch_size > n_train:
        raise ValueError(f"batch size {settings.batch_size} is larger than the {n_train} training examples (drop_last would leave no batch)")

    timing.seconds["data_s"] += time.perf_counter() - started
    key_model = jax.random.split(jax.random.PRNGKey(runs[0][2].trainer.seed), 3)[0]
    t_model = time.perf_counter()
    config, base = resolve_model(settings.model, init=settings.init, models_dir=settings.models_dir, key=key_model, drop_rate=settings.drop_rate)
    timing.seconds["model_s"] += time.perf_counter() - t_model
    t_data = time.perf_counter()
    encoded = {seed: encode_splits(f, list(class_names), tokenizer, max_length=recipe.max_length, context_length=config.context_length)
               for seed, f in by_seed.items()}
    for data in encoded.values():
        check_data_vocabulary(settings.model, config, data)
    timing.seconds["data_s"] += time.perf_counter() - t_data
    t_model = time.perf_counter()
    trainables, frozen, mask, model_config = [], None, None, config
    for _, _, r in runs:
        _, key_head, key_lora = jax.random.split(jax.random.PRNGKey(r.trainer.seed), 3)
        model_config, params = with_classifier_head(config, base, len(class_names), key_head)
        if settings.lora_rank:
            model_config, params = add_lora(model_config, params, settings.lora_rank, settings.lora_alpha, key_lora)
        mask = optim.trainable_mask(model_config, params, settings.trainable, settings.final_norm)
        trainable, frozen = optim.split(params, mask)
        trainables.append(trainable)
    config = model_config
    timing.seconds["model_s"] += time.perf_counter() - t_model
    datas = [encoded[r.trainer.seed] for _, _, r in runs]
    tokens, lengths, rows = build_pool(datas, [r.trainer.seed for _, _, r in runs])

    enabled = recipe.trunk_cache is not False
    plan = trunk.plan(config, mask, enabled=enabled, rows=len(tokens), seq=tokens.shape[1], max_bytes=recipe.trunk_cache_max_gb * 1e9)
    start_block = plan.start_block if plan.used else None
    per_run = run_bytes(config, _count(trainables[0]), settings, tokens.shape[1], start_block)
    shared = 4 * _count(frozen) + (plan.bytes if plan.used else tokens.nbytes)
    check_memory(k, per_run, shared, memory_gb)
    if claim is not None:
        claim()

    cache = plan.record()
    if plan.used:
        t0 = time.perf_counter()
        widths = trunk.needed_widths(recipe.pooling, lengths)  # only what the pooling reads
        params = optim.merge(trainables[0], frozen)
        progress = None if settings.progress else False  # --no-progress: no bar here either
        if widths is None:  # "last": each row up to the widest run that reads it
            x, positions = _trunk_by_width(config, params, tokens, plan.start_block, row_widths(rows, len(tokens)), settings.batch_size, progress)
        else:
            x, positions = trunk.trunk_pass(config, params, tokens, plan.start_block, batch_size=settings.batch_size, widths=widths, progress=progress)
        cache = {**plan.record(time.perf_counter() - t0, positions), "bytes": x.nbytes}
        timing.seconds["trunk_s"] += cache["seconds"]
        log(f"Trunk cache: {plan.reason}; {len(tokens)} distinct examples x {tokens.shape[1]} positions, {trunk.gigabytes(x.nbytes)}, {cache['seconds']:.1f} s")
    else:
        x = tokens
        if enabled:
            log(f"Trunk cache not used: {plan.reason}")
    pool = jax.device_put({"x": x, "lengths": lengths})
    frozen = jax.device_put(frozen)
    state = init_states(settings, trainables, [r.trainer.lr for _, _, r in runs], [r.trainer.weight_decay for _, _, r in runs],
                        [r.trainer.seed for _, _, r in runs], steps_per_epoch=batching_steps(n_train, settings.batch_size))
    # Runs with one seed see the same rows in the same order: their batches are shared.
    same_batches = all(
        r.seed == rows[0].seed and r.width == rows[0].width
        and all(np.array_equal(r.rows[s], rows[0].rows[s]) and np.array_equal(r.lengths[s], rows[0].lengths[s]) for s in SPLITS)
        for r in rows
    )
    train_step, eval_step = make_sweep_steps(config, settings, recipe.pooling, start_block, shared=same_batches,
                                             steps_per_epoch=batching_steps(n_train, settings.batch_size))
    log(f"sweep of {k} runs ({', '.join(n for n, _, _ in runs)}); ~{(shared + k * per_run) / 1e9:.2f} GB estimated")

    B, pad = settings.batch_size, recipe.padding

    def ev(split: str, n: int | None = None, epoch: int = 0) -> list[dict[str, float]]:
        it = batches(rows, split, B, pad, shuffle=split == "train", epoch=epoch)
        with timing.phase("eval_s"):
            return evaluate(eval_step, state.trainable, frozen, pool, it, n)

    n = settings.eval_iter
    tr, va = ev("train", n), ev("validation", n)
    initial = [{"initial_train_loss": a["loss"], "initial_validation_loss": b["loss"]} for a, b in zip(tr, va)]
    hist = {key: [[] for _ in runs] for key in ("train_losses", "val_losses", "train_accs", "val_accs")}
    eval_steps, epoch_seen, step_losses, diverged = [], [], [], [None] * k
    total_seen, global_step = 0, -1
    t_train = time.perf_counter()
    done = lambda: settings.max_steps is not None and global_step + 1 >= settings.max_steps
    for epoch in range(settings.epochs):
        for batch, width in batches(rows, "train", B, pad, shuffle=True, epoch=epoch):
            state, m = train_step(state, frozen, pool, batch, width)
            losses = np.asarray(m["loss"], np.float64)
            timing.first_step_done()
            global_step += 1
            step_losses.append(losses.tolist())
            for r in np.flatnonzero(~np.isfinite(losses)):
                diverged[r] = global_step + 1 if diverged[r] is None else diverged[r]
            total_seen += int(batch["weights"][0].sum())
            if global_step % settings.eval_freq == 0:
                tr, va = ev("train", n, epoch), ev("validation", n)
                for r in range(k):
                    hist["train_losses"][r].append(tr[r]["loss"])
                    hist["val_losses"][r].append(va[r]["loss"])
                eval_steps.append(global_step)
                log(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {_join(tr, 'loss')}, Val loss {_join(va, 'loss')}")
            if done():
                break
        epoch_seen.append(total_seen)
        tr, va = ev("train", n, epoch), ev("validation", n)
        for r in range(k):
            hist["train_accs"][r].append(tr[r]["accuracy"])
            hist["val_accs"][r].append(va[r]["accuracy"])
        log(f"Training accuracy: {_join(tr, 'accuracy')} | Validation accuracy: {_join(va, 'accuracy')}")
        if done():
            break
    train_seconds = time.perf_counter() - t_train
    timing.seconds["train_s"] += train_seconds
    t_outputs = time.perf_counter()
    total_steps = global_step + 1
    log(f"Training completed in {train_seconds / 60:.2f} minutes.")
    final = {"train": ev("train", None, settings.epochs), "validation": ev("validation"), "test": ev("test")}
    trained = jax.device_get(state.trainable)
    frozen_host = jax.device_get(frozen)
    steps_per_epoch = batching_steps(n_train, B)
    epochs_run = total_steps / steps_per_epoch

    results: dict[str, Any] = {}
    for r, (name, values, run_recipe) in enumerate(runs):
        run_dir = out_dir / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        params = optim.merge(jax.tree_util.tree_map(lambda a: a[r], trained), frozen_host)
        outputs: dict[str, Any] = {"plots": []}
        if hist["train_losses"][r]:
            outputs["plots"] += [str(p) for p in plot_values(epochs_run, total_seen, hist["train_losses"][r], hist["val_losses"][r], run_dir, "loss")]
        data = datas[r]
        if save_models:
            outputs["model"] = str(train.save_model_dir(config, params, run_dir / "model", Classifier.metadata(data.class_names, data.max_length, recipe.pooling)))
            if settings.export_pth:
                outputs["torch_reference"] = str(weights.export(config, params, run_dir / "review_classifier.pth", "torch-reference"))
        if split_here:
            spam.write_splits(run_dir / "data", *by_seed[run_recipe.trainer.seed])
        outputs["plots"] += [str(p) for p in plot_values(epochs_run, total_seen, hist["train_accs"][r], hist["val_accs"][r], run_dir, "accuracy")]
        metrics = {
            **initial[r],
            **{f"{s}_accuracy": final[s][r]["accuracy"] for s in SPLITS},
            **{f"{s}_loss": final[s][r]["loss"] for s in SPLITS},
            "epoch_train_accuracy": hist["train_accs"][r],
            "epoch_validation_accuracy": hist["val_accs"][r],
            "examples_seen": total_seen,
            "class_names": data.class_names,
            "split_sizes": {s: len(getattr(data, s)) for s in SPLITS},
            "padded_length": data.max_length,
            "trunk_cache": cache,
            "eval_steps": eval_steps,
            "eval_train_losses": hist["train_losses"][r],
            "eval_validation_losses": hist["val_losses"][r],
            "train_step_losses": [s[r] for s in step_losses],
            "steps": total_steps,
            "epochs": epochs_run,
            "train_seconds": train_seconds,
            "total_seconds": time.perf_counter() - started,
            "train_step_compilations": train_step._cache_size(),
            "eval_step_compilations": eval_step._cache_size(),
            "model_config": config.to_dict(),
            "recipe": dataclasses.asdict(run_recipe),
            "mesh": None,  # a sweep runs on one device
            "outputs": outputs,
            "timing": {**timing.record(), "outputs_s": time.perf_counter() - t_outputs},  # outputs: so far
            "run": {**train.run_info(), "sweep": {"size": k, "index": r, "values": values, "diverged_at_step": diverged[r]}},
        }
        write_json(run_dir / train.METRICS_FILE, metrics)
        results[name] = metrics
    summary = write_summary(out_dir, runs, results, diverged)
    plots = plot_sweep(out_dir, results)
    record = {"grid": grid, "runs": [n for n, _, _ in runs], "summary": str(summary), "plots": [str(p) for p in plots],
              "memory_estimate_bytes": {"per_run": per_run, "shared": shared, "budget": memory_gb * 1e9},
              "step_losses": {name: [s[r] for s in step_losses] for r, (name, _, _) in enumerate(runs)},
              "train_seconds": train_seconds, "total_seconds": time.perf_counter() - started}
    write_json(out_dir / "sweep.json", record)
    return {**record, "runs": results}


def _join(results: list[dict[str, float]], key: str) -> str:
    """One value per run, in the reference's formats."""
    if key == "accuracy":
        return " ".join(f"{r[key] * 100:.2f}%" for r in results)
    return " ".join(f"{r[key]:.3f}" for r in results)


def batching_steps(n: int, batch_size: int) -> int:
    return n // batch_size


SUMMARY_COLUMNS = ("initial_train_loss", "initial_validation_loss", "train_accuracy", "validation_accuracy", "test_accuracy",
                   "train_loss", "validation_loss", "test_loss")


def write_summary(out_dir: Path, runs: list, results: dict[str, Any], diverged: list) -> Path:
    """OUT/summary.csv: one row per run: its name, lr, weight decay, seed, final metrics, status."""
    path = out_dir / "summary.csv"
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "lr", "weight_decay", "seed", *SUMMARY_COLUMNS, "status"])
        for (name, _, r), d in zip(runs, diverged):
            m = results[name]
            status = "completed" if d is None else f"non-finite loss at step {d}"
            writer.writerow([name, r.trainer.lr, r.trainer.weight_decay, r.trainer.seed, *(m[c] for c in SUMMARY_COLUMNS), status])
    return path


def plot_sweep(out_dir: Path, results: dict[str, Any]) -> list[Path]:
    """OUT/sweep-plot.{pdf,png}: validation loss at each evaluation and validation accuracy
    after each epoch, one line per setting."""
    fig = new_figure(figsize=(10, 3.5))
    ax1, ax2 = fig.subplots(1, 2)
    for name, m in results.items():
        ax1.plot(m["eval_steps"], m["eval_validation_losses"], label=name)
        ax2.plot(range(1, len(m["epoch_validation_accuracy"]) + 1), m["epoch_validation_accuracy"], marker="o", label=name)
    ax1.set_xlabel("Step")
    ax1.set_ylabel("Validation loss")
    ax2.set_xlabel("Epoch")
    ax2.set_ylabel("Validation accuracy")
    ax2.legend(fontsize="x-small")
    fig.tight_layout()
    return save_figure(fig, out_dir / "sweep-plot")
