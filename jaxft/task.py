"""What a recipe hands `jaxft.train.fit` (a `Task`: its batches, what it measures, its outputs)
and what the task's hooks see of the run (`Run`, with its `History`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from jax.sharding import Mesh

from . import sharding
from .config import GPTConfig
from .model import param_count
from .settings import TrainerSettings
from .steps import Batch, Params, TrainState, evaluate, make_steps
from .timing import Timing


@dataclass
class History:
    """Training curves: losses at each periodic evaluation, with the step and the examples
    (or tokens) seen by then; what was seen by the end of each epoch; totals."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    epoch_seen: list[int] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # every training step's batch loss
    eval_metrics: dict[str, list[float]] = field(default_factory=dict)  # Task.eval_metrics at each evaluation: "train_KEY", "validation_KEY"
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
    mesh: Mesh | None = None  # None: one device, arrays placed as JAX places them
    timing: Timing = field(default_factory=Timing)

    @property
    def params(self) -> Params:
        return self.state.params

    def place(self, batch: Batch) -> Batch:
        """A host batch as the steps take it: on a mesh, this process's rows of the global
        batch, split over the devices; else unchanged."""
        if self.mesh is None:
            return batch
        rows = sharding.process_rows(len(next(iter(batch.values()))), self.mesh)
        return sharding.global_batch({key: value[rows] for key, value in batch.items()}, self.mesh)

    def evaluate(self, batches: Iterator[Batch], num_batches: int | None = None, params: Params | None = None, means: Any = ()) -> dict[str, float]:
        with self.timing.phase("eval_s"):
            return evaluate(self.eval_step, self.params if params is None else params, map(self.place, batches), num_batches, means=means)


class Task:
    """What a recipe supplies to `fit`. Subclasses set the class attributes and implement
    the batch methods; the hooks default to doing nothing."""

    loss: str = "classification"  # make_steps' task: "classification" or "lm"
    pooling: str = "last"  # classification only
    seen_label: str = "Examples seen"  # the loss plot's upper x axis
    eval_metrics: dict[str, str] = {}  # eval-step metrics also averaged, logged and kept at each evaluation: key -> log label

    def make_steps(self, config: GPTConfig, optimizer: Any, **options: Any) -> tuple[Callable, Callable]:  # options: fit's and step_options'
        return make_steps(config, optimizer, self.loss, pooling=self.pooling, **options)

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

    seen_unit: str = "examples"  # what `seen` counts, for progress rates

    def step_options(self, config: GPTConfig, params: Params, mask: Params, log: Callable[[str], None]) -> dict[str, Any]:
        """Extra options for `make_steps` (e.g. `start_block` with a cached frozen trunk);
        called once, before training, with the initial parameters and the trainable mask."""
        return {}

    def example_batches(self) -> tuple[list[Batch], list[Batch]]:
        """(train, eval) batches of each shape the run meets (default: the first): compiled for ahead of time."""
        return [*itertools.islice(self.train_batches(0), 1)], [*itertools.islice(self.eval_batches("validation"), 1)]

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

    def state_dict(self) -> dict[str, Any]:
        """What the task accumulated during training (JSON-able), stored in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned (on resume)."""

    def data_hash(self) -> str | None:
        """A digest of the training data (a resumed run must train on the same data)."""
        return None

    def data_hashes(self) -> dict[str, str]:
        """A digest of each split, by a name for messages ("validation data (--validation FILE)"): a
        resume refuses other data in any of them (its history would mix two data sets)."""
        return {} if self.data_hash() is None else {"training data": self.data_hash()}
