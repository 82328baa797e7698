"""The one training run: `fit`, the loop around the steps (settings: jaxft.settings).

A recipe (jaxft.recipes.classify, jaxft.recipes.instruct) prepares the model and its data,
then hands `fit` a `Task`: its batches and what it measures. `fit` owns the rest of the
chain: trainable mask -> optimizer -> state -> jit steps (sharded on a device mesh) ->
initial evaluation -> the loop with the reference's evaluation schedule and log lines,
progress, checkpoints and graceful interruption (jaxft.resume) -> final evaluation -> loss
plot, model directory, optional reference `.pth` -> metrics.json (written last: its
presence means the run completed). `_train_epochs` is the only place that steps the state,
`make_steps` the only place that compiles, `Task.train_batches` the only source of
training data.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax

from . import distributed, optim, programs, sharding, weights
from .config import GPTConfig
from .plots import plot_values
from .steps import (
    Params,
    TrainState,
    compile_count,
    evaluate,
    host_values,
    init_state,
    make_steps,
)
from .fileio import atomic_dir, write_json
from .interrupts import catch_signals, check as stop_if_signalled
from .resume import Checkpoints, Interrupted, NonFiniteLoss, Position, TrainingStopped, fingerprint
from .progress import Progress
from .settings import TrainerSettings, run_mesh
from .task import History, Run, Task
from .timing import Timing, run_info

__all__ = ["TrainingStopped", "Interrupted", "NonFiniteLoss", "TrainerSettings", "Task", "History", "Run", "fit", "make_steps", "init_state", "evaluate", "compile_count", "TrainState"]

METRICS_FILE = "metrics.json"


def _train_epochs(run: Run, train_step: Callable, task: Task, position: Position | None = None,
                  checkpoints: Checkpoints | None = None) -> None:
    """The reference's train_classifier_simple / train_model_simple loop.

    Evaluates every `eval_freq` steps on `eval_iter` training and validation batches (the
    first time at step 0, after one update, as the reference does), logs the reference's line,
    and calls `task.epoch_end` after each epoch. Stops early after `max_steps` steps.

    From `position` (a resumed run: the batches of its epoch already done are skipped; the
    batches are a function of (seed, epoch)). With `checkpoints`, saves every
    `checkpoint_every` steps (default: at each epoch end); SIGINT/SIGTERM stop the run after
    the current step with a checkpoint (`Interrupted`); a non-finite loss stops it at once
    (`NonFiniteLoss`).
    """
    settings, history = run.settings, run.history
    position = position if position is not None else Position()
    global_step = history.total_steps - 1
    start = time.perf_counter()

    def done() -> bool:
        return settings.max_steps is not None and global_step + 1 >= settings.max_steps

    def save() -> None:
        nonlocal start
        history.seconds += time.perf_counter() - start  # the checkpoint's history holds the time so far
        start = time.perf_counter()
        where = (history.total_steps, (position.epoch, position.batch))
        if checkpoints is not None and (checkpoints.last, checkpoints.last_position) != where:
            checkpoints.save(run, task, position)  # (the same step again after its epoch's end: replaced)

    def stop_if_asked() -> None:
        """After a step or an epoch's end: a caught SIGINT/SIGTERM checkpoints and stops. With
        several processes, a signal any of them caught stops all at this same step (a process
        that saved alone would wait for the others inside orbax while they wait in the next step)."""
        requested = distributed.any_process(stop.requested or 0)
        if requested:
            save()
            if checkpoints is not None:
                checkpoints.wait()
            raise Interrupted(history.total_steps, requested, checkpoints is not None)

    try:
        with catch_signals() as stop:
            for epoch in range(position.epoch, settings.epochs):
                if position.epoch != epoch:
                    position.epoch, position.batch = epoch, 0
                if done() and position.batch == 0:  # resumed after the last epoch_end
                    break
                if not done():  # else a resumed run stopped at max_steps mid-epoch: only epoch_end is left
                    total = task.steps_per_epoch()
                    if settings.max_steps is not None:
                        total = min(total, settings.max_steps - epoch * total)
                    progress = Progress(total - position.batch, f"epoch {epoch + 1}/{settings.epochs}", task.seen_unit, run.log, settings.progress)
                    for batch in itertools.islice(task.train_batches(epoch), position.batch, None):
                        run.state, metrics = train_step(run.state, run.place(batch))
                        scalars = host_values({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]})  # one host sync per step
                        loss, grad_norm = float(scalars["loss"]), float(scalars["grad_norm"])
                        run.timing.first_step_done()
                        global_step += 1
                        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                            what = "training loss" if not math.isfinite(loss) else "gradient norm"
                            raise NonFiniteLoss(global_step + 1, loss if what == "training loss" else grad_norm, checkpoints.last_good() if checkpoints else None, what)
                        history.step_losses.append(loss)
                        progress.update(task.seen(batch), loss)
                        history.total_seen += task.seen(batch)
                        history.total_steps = global_step + 1
                        position.batch += 1
                        if global_step % settings.eval_freq == 0:
                            train_eval = run.evaluate(task.train_batches(epoch), settings.eval_iter, means=task.eval_metrics)
                            val_eval = run.evaluate(task.eval_batches("validation"), settings.eval_iter, means=task.eval_metrics)
                            train_loss, val_loss = train_eval["loss"], val_eval["loss"]
                            for key, (split, values) in itertools.product(task.eval_metrics, (("train", train_eval), ("validation", val_eval))):
                                history.eval_metrics.setdefault(f"{split}_{key}", []).append(values[key])  # the task's besides the loss
                            extra = "".join(f", Train {label} {train_eval[k]:.3f}, Val {label} {val_eval[k]:.3f}" for k, label in task.eval_metrics.items())
                            history.train_losses.append(train_loss)
                            history.val_losses.append(val_loss)
                            history.steps.append(global_step)
                            history.seen.append(history.total_seen)
                            progress.write(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}{extra}")
                        if settings.checkpoint_every is not None and history.total_steps % settings.checkpoint_every == 0:
                            save()
                        stop_if_asked()
                        if done():
                            break
                    progress.close()
                history.epoch_seen.append(history.total_seen)
                history.total_steps = global_step + 1
                task.epoch_end(run, epoch)
                position.epoch, position.batch = epoch + 1, 0
                if settings.checkpoint_every is None:
                    save()
                stop_if_asked()  # a signal during epoch_end's evaluations (the last one too)
                if done():
                    break
            save()  # the end of training (with --checkpoint-every it may fall between checkpoints):
            # a run stopped during the final evaluation or the outputs resumes there, not steps back
    finally:
        history.seconds += time.perf_counter() - start


def save_model_dir(config: GPTConfig, params: Params, path: Path, metadata: dict[str, Any]) -> Path:
    """The jaxft model directory: config and parameters appear together in one rename, so no
    reader ever pairs new weights with an old config."""
    with atomic_dir(path) as tmp:
        weights.export(config, params, tmp, "jaxft", metadata=metadata)
    return path


def fit(
    settings: TrainerSettings,
    config: GPTConfig,
    params: Params,
    task: Task,
    out_dir: str | Path,
    *,
    record: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    started: float | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    timing: Timing | None = None,
) -> dict[str, Any]:
    """Train `params` on `task` with `settings`, evaluate, and write the run's outputs to
    `out_dir`: loss plot, `model/`, the reference `.pth` when asked, and `metrics.json`
    (returned), which stores `record` (the recipe's full settings) under "recipe".
    `config`/`params` are the model after the recipe's surgery (head, LoRA).

    With `checkpoint_dir`, training writes checkpoints there (see `_train_epochs`); with
    `resume` too, it continues from the latest one, which must have been written with equal
    settings (`record`) and training data. `timing`: the run's clock, started by the caller at its
    first work (data_s, model_s so far); metrics.json's `timing` object."""
    timing = Timing() if timing is None else timing
    started = time.perf_counter() if started is None else started
    out_dir = Path(out_dir)
    main = distributed.is_main_process()
    if not main:
        log = _quiet  # only process 0 logs and writes outputs
    mesh = run_mesh(settings.mesh)
    if jax.process_count() > 1:
        # the same settings and the same training data (one host's other copy of a file would
        # build other batches, and other steps per epoch: a wait at an epoch's end)
        distributed.check_same_settings({**(record if record is not None else dataclasses.asdict(settings)), "training data": task.data_hash()})
    mask = optim.trainable_mask(config, params, settings.trainable, settings.final_norm)
    optimizer = optim.adamw(
        settings.lr, settings.weight_decay, grad_clip_norm=settings.grad_clip_norm, accumulation_steps=settings.accumulation_steps,
        steps_per_epoch=task.steps_per_epoch(), last_step=settings.max_steps,
    )
    with timing.phase("model_s"):
        state = init_state(params, mask, optimizer, seed=settings.seed, scan_layers=settings.scan_layers)
    del params  # the state holds its own copy
    # Loaded frozen weights must be those the run began with (random ones follow from the settings,
    # and a GPU may round their init differently); computed before sharding: addressable here
    frozen_hash = fingerprint(state.frozen) if checkpoint_dir is not None and settings.init == "pretrained" else None
    with timing.phase("trunk_s"):
        options = task.step_options(config, state.params, mask, log)  # e.g. a cached frozen trunk
    stop_if_signalled()  # safe points (jaxft.interrupts): a signal stops the run after the phase it lands in
    dtype = settings.compute_dtype
    train_step, eval_step = task.make_steps(config, optimizer, remat=settings.remat, dtype=dtype, attention=settings.attention,
                                            scan_layers=settings.scan_layers, **options)
    if mesh is not None:  # parameters and optimizer state sharded by the rules, batches by rows
        state = sharding.shard_tree(state, mesh)
        train_step, eval_step = sharding.shard_steps(train_step, eval_step, mesh, state)
        log(f"mesh {sharding.describe(mesh)} over {mesh.size} devices ({jax.process_count()} process(es))")
    run = Run(config, settings, eval_step, log, state, mesh=mesh, timing=timing)
    pool = programs.worker_pool()  # the initial evaluation and the first checkpoint overlap the compilations
    train_step, run.eval_step = programs.precompile_steps(pool, train_step, eval_step, state, *task.example_batches(), run.place, log)
    log(task.describe(config, state.params, state.trainable))

    record = record if record is not None else dataclasses.asdict(settings)
    checkpoints = Checkpoints(Path(checkpoint_dir), settings, record, task, frozen_hash, config) if checkpoint_dir is not None else None
    try:
        position = checkpoints.restore(run, task) if checkpoints is not None and resume else None
        if position is None:
            position = Position(initial=task.initial(run))
            if checkpoints is not None:
                checkpoints.save(run, task, position)  # step 0: a resume never needs the initial evaluation again
        else:
            log(f"resuming from step {run.history.total_steps} (epoch {position.epoch + 1}, batch {position.batch})")
        stop_if_signalled()
        initial = position.initial
        with timing.phase("train_s"):
            _train_epochs(run, train_step, task, position, checkpoints)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # (a worker still compiling finishes on its own)
        if checkpoints is not None:
            checkpoints.close()
    history = run.history
    log(f"Training completed in {history.seconds / 60:.2f} minutes.")

    final = task.final(run)
    outputs_started = time.perf_counter()
    run.state = distributed.gather(run.state)  # outputs from whole host copies (all-gathered across processes)
    stop_if_signalled()
    params = run.params
    epochs_run = history.total_steps / task.steps_per_epoch()  # fewer than settings.epochs with max_steps

    metrics = {
        **initial,
        **final,
        "eval_steps": history.steps,
        "eval_train_losses": history.train_losses,
        "eval_validation_losses": history.val_losses,
        "train_step_losses": history.step_losses,
        "steps": history.total_steps,
        "epochs": epochs_run,
        "train_seconds": history.seconds,
        "train_step_compilations": compile_count(train_step),
        "eval_step_compilations": compile_count(run.eval_step),
        "model_config": config.to_dict(),
        "recipe": record,
        "mesh": sharding.describe(mesh) if mesh is not None else None,
    }
    if not main:
        return metrics
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Any] = {"plots": []}
    if history.train_losses:
        drawn = plot_values(epochs_run, history.total_seen, history.train_losses, history.val_losses, out_dir, "loss", seen_label=task.seen_label)
        outputs["plots"] += [str(p) for p in drawn]
    outputs["model"] = str(save_model_dir(config, params, out_dir / "model", task.model_metadata()))
    stop_if_signalled()
    if settings.export_pth:
        outputs["torch_reference"] = str(weights.export(config, params, out_dir / task.pth_name(config), "torch-reference",
                                                                    metadata=task.model_metadata()))  # + its sidecar
        stop_if_signalled()
    task_metrics, task_outputs = task.outputs(run, out_dir, params)
    stop_if_signalled()  # (after the responses of an instruction run: a stop waits for them)
    outputs["plots"] += task_outputs.pop("plots", [])
    outputs.update(task_outputs)

    metrics.update(task_metrics)
    metrics.update({"total_seconds": time.perf_counter() - started, "outputs": outputs, "run": run_info()})
    timing.seconds["outputs_s"] += time.perf_counter() - outputs_started
    metrics["timing"] = timing.record()
    write_json(out_dir / METRICS_FILE, metrics)
    return metrics


def _quiet(line: str) -> None:
    """The log of every process but the first."""
