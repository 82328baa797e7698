"""The one training run: settings every recipe shares, and `fit`, the loop around the steps.

A recipe (jaxft.recipes.classify, jaxft.recipes.instruct) prepares the model and its data,
then hands `fit` a `Task`: its batches and what it measures. `fit` owns the rest of the
chain: trainable mask -> optimizer -> state -> jit steps -> initial evaluation -> the loop
with the reference's evaluation schedule and log lines -> final evaluation -> loss plot,
model directory, optional reference `.pth` -> metrics.json (written last: its presence
means the run completed).

Where later features plug in: `_train_epochs` is the only place that steps the state (the
place for checkpoints and interruption), `make_steps` the only place that compiles (the
place for shardings), `Task.train_batches` the only source of training data.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import jax

from . import optim, weights
from .config import GPTConfig
from .model import param_count
from .plots import plot_values
from .steps import (
    Batch,
    Params,
    TrainState,
    compile_count,
    evaluate,
    init_state,
    make_steps,
)
from .fileio import atomic_dir, write_json

__all__ = ["TrainerSettings", "Task", "History", "Run", "fit", "make_steps", "init_state", "evaluate", "compile_count", "TrainState"]

METRICS_FILE = "metrics.json"
TRAINABLE_HELP = "head | last-block | last-N-blocks (e.g. last-2-blocks) | all | lora"


def setting(default: Any, help: str, group: str = "training", **extra: Any) -> Any:
    """A settings field; the CLI makes it a flag with this help text, in this help group,
    with any extra argparse options (e.g. choices)."""
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass(frozen=True)
class TrainerSettings:
    """The settings every fine-tuning recipe shares (composed into each recipe's settings as
    `trainer`, like Levanter's `trainer:`). Defaults are the classification recipe's; each
    recipe states its own defaults."""

    model: str = setting("gpt2-small (124M)", "size name, checkpoint path, or OpenAI-style hparams.json", group="model")
    init: str = setting("pretrained", "start from pretrained weights or GPT-2's random initialisation", choices=("pretrained", "random"), group="model")
    models_dir: str = setting("gpt2", "where OpenAI checkpoints are (or get downloaded)", group="model")
    trainable: str = setting("last-block", TRAINABLE_HELP, group="model")
    final_norm: bool | None = setting(None, "train the final LayerNorm (on/off; default on unless --trainable head or lora)", group="model")
    lora_rank: int = setting(0, "add LoRA adapters of this rank (use with --trainable lora)", group="model")
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (updates scale by alpha / rank)", group="model")
    drop_rate: float = setting(0.0, "dropout rate while training", group="model")
    epochs: int = setting(5, "passes over the training split")
    batch_size: int = setting(8, "examples per optimizer step")
    lr: float = setting(5e-5, "AdamW learning rate")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay")
    grad_clip_norm: float | None = setting(None, "clip gradients to this global norm (default: no clipping)")
    accumulation_steps: int = setting(1, "accumulate gradients over this many batches per update")
    eval_freq: int = setting(50, "evaluate every this many steps")
    eval_iter: int = setting(5, "batches per periodic evaluation")
    max_steps: int | None = setting(None, "stop training after this many steps (quick runs)")
    remat: bool = setting(False, "recompute each block's activations in the backward pass (less memory)")
    seed: int = setting(123, "seed of the data order, head initialisation and dropout")
    export_pth: bool = setting(False, "also write the reference's state dict (.pth)", group="output")

    def validate(self) -> None:
        """One-line errors for settings that cannot work, before anything runs."""
        if self.init not in ("pretrained", "random"):
            raise ValueError(f"init must be 'pretrained' or 'random', got {self.init!r}")
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max-steps must be >= 1, got {self.max_steps}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad-clip-norm must be > 0, got {self.grad_clip_norm}")
        if self.lora_rank < 0:
            raise ValueError(f"lora-rank must be >= 0, got {self.lora_rank}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop-rate must be in [0, 1), got {self.drop_rate}")
        optim.check_trainable(self.trainable)


@dataclass
class History:
    """Training curves: losses at each periodic evaluation, with the step and the examples
    (or tokens) seen by then; what was seen by the end of each epoch; totals."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    epoch_seen: list[int] = field(default_factory=list)
    total_seen: int = 0
    total_steps: int = 0
    seconds: float = 0.0


@dataclass
class Run:
    """What a task's hooks see of the run: the model, the steps, and evaluation helpers."""

    config: GPTConfig
    settings: TrainerSettings
    eval_step: Callable
    log: Callable[[str], None]
    state: TrainState | None = None
    history: History = field(default_factory=History)

    @property
    def params(self) -> Params:
        return self.state.params

    def evaluate(self, batches: Iterator[Batch], num_batches: int | None = None, params: Params | None = None) -> dict[str, float]:
        return evaluate(self.eval_step, self.params if params is None else params, batches, num_batches)


class Task:
    """What a recipe supplies to `fit`. Subclasses set the class attributes and implement
    the batch methods; the hooks default to doing nothing."""

    loss: str = "classification"  # make_steps' task: "classification" or "lm"
    pooling: str = "last"  # classification only
    seen_label: str = "Examples seen"  # the loss plot's upper x axis

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """The training batches of `epoch`, a function of (seed, epoch) only."""
        raise NotImplementedError

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """The batches of "validation" or "test", in order."""
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def seen(self, batch: Batch) -> int:
        """How many examples (or tokens) a training batch counts for the history."""
        raise NotImplementedError

    def step_options(self, config: GPTConfig, params: Params, mask: Params, log: Callable[[str], None]) -> dict[str, Any]:
        """Extra options for `make_steps` (e.g. `start_block` with a cached frozen trunk);
        called once, before training, with the initial parameters and the trainable mask."""
        return {}

    def describe(self, config: GPTConfig, params: Params, trainable: Params) -> str:
        """The line logged before training."""
        return f"model {config.name}: {param_count(params):,} parameters, {param_count(trainable):,} trainable"

    def initial(self, run: Run) -> dict[str, Any]:
        """Evaluate before training (the reference's lines); returns metrics to record."""
        return {}

    def epoch_end(self, run: Run, epoch: int) -> None:
        """After each epoch (accuracies, a sample text)."""

    def final(self, run: Run) -> dict[str, Any]:
        """Evaluate after training; returns metrics to record."""
        return {}

    def model_metadata(self) -> dict[str, Any]:
        """Stored with the saved model (what prediction needs besides the weights)."""
        return {}

    def pth_name(self, config: GPTConfig) -> str:
        return "model.pth"

    def outputs(self, run: Run, out_dir: Path, params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
        """Task-specific outputs written after the model: (metrics, output paths)."""
        return {}, {}


def _train_epochs(run: Run, train_step: Callable, task: Task) -> None:
    """The reference's train_classifier_simple / train_model_simple loop.

    Evaluates every `eval_freq` steps on `eval_iter` training and validation batches (the
    first time at step 0, after one update, as the reference does), logs the reference's line,
    and calls `task.epoch_end` after each epoch. Stops early after `max_steps` steps.
    """
    settings, history = run.settings, run.history
    global_step = history.total_steps - 1
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        for batch in task.train_batches(epoch):
            run.state, _ = train_step(run.state, batch)
            history.total_seen += task.seen(batch)
            global_step += 1
            if global_step % settings.eval_freq == 0:
                train_loss = run.evaluate(task.train_batches(epoch), settings.eval_iter)["loss"]
                val_loss = run.evaluate(task.eval_batches("validation"), settings.eval_iter)["loss"]
                history.train_losses.append(train_loss)
                history.val_losses.append(val_loss)
                history.steps.append(global_step)
                history.seen.append(history.total_seen)
                run.log(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            if settings.max_steps is not None and global_step + 1 >= settings.max_steps:
                break
        history.epoch_seen.append(history.total_seen)
        history.total_steps = global_step + 1
        task.epoch_end(run, epoch)
        if settings.max_steps is not None and history.total_steps >= settings.max_steps:
            break
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
) -> dict[str, Any]:
    """Train `params` on `task` with `settings`, evaluate, and write the run's outputs to
    `out_dir`: loss plot, `model/`, the reference `.pth` when asked, and `metrics.json`
    (returned), which stores `record` (the recipe's full settings) under "recipe".
    `config`/`params` are the model after the recipe's surgery (head, LoRA)."""
    started = time.perf_counter() if started is None else started
    out_dir = Path(out_dir)
    mask = optim.trainable_mask(config, params, settings.trainable, settings.final_norm)
    optimizer = optim.adamw(
        settings.lr, settings.weight_decay, grad_clip_norm=settings.grad_clip_norm, accumulation_steps=settings.accumulation_steps
    )
    state = init_state(params, mask, optimizer, seed=settings.seed)
    del params  # the state holds its own copy
    options = task.step_options(config, state.params, mask, log)  # e.g. a cached frozen trunk
    train_step, eval_step = make_steps(config, optimizer, task.loss, pooling=task.pooling, remat=settings.remat, **options)
    run = Run(config, settings, eval_step, log, state)
    log(task.describe(config, state.params, state.trainable))

    initial = task.initial(run)
    _train_epochs(run, train_step, task)
    history = run.history
    log(f"Training completed in {history.seconds / 60:.2f} minutes.")

    final = task.final(run)
    run.state = jax.device_get(run.state)  # outputs from host copies
    params = run.params
    epochs_run = history.total_steps / task.steps_per_epoch()  # fewer than settings.epochs with max_steps

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Any] = {"plots": []}
    if history.train_losses:
        drawn = plot_values(epochs_run, history.total_seen, history.train_losses, history.val_losses, out_dir, "loss", seen_label=task.seen_label)
        outputs["plots"] += [str(p) for p in drawn]
    outputs["model"] = str(save_model_dir(config, params, out_dir / "model", task.model_metadata()))
    if settings.export_pth:
        outputs["torch_reference"] = str(weights.export(config, params, out_dir / task.pth_name(config), "torch-reference"))
    task_metrics, task_outputs = task.outputs(run, out_dir, params)
    outputs["plots"] += task_outputs.pop("plots", [])
    outputs.update(task_outputs)

    metrics = {
        **initial,
        **final,
        **task_metrics,
        "eval_steps": history.steps,
        "eval_train_losses": history.train_losses,
        "eval_validation_losses": history.val_losses,
        "steps": history.total_steps,
        "epochs": epochs_run,
        "train_seconds": history.seconds,
        "total_seconds": time.perf_counter() - started,
        "train_step_compilations": compile_count(train_step),
        "eval_step_compilations": compile_count(eval_step),
        "model_config": config.to_dict(),
        "recipe": record if record is not None else dataclasses.asdict(settings),
        "outputs": outputs,
        "run": run_info(),
    }
    write_json(out_dir / METRICS_FILE, metrics)
    return metrics


def run_info() -> dict[str, Any]:
    """Where and when a run happened (stored with its metrics)."""
    devices = jax.devices()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": devices[0].device_kind if devices else "unknown",
        "python": platform.python_version(),
    }
