"""What `fit` keeps across a restart: the state's arrays and the run's record in orbax
checkpoints (jaxft.checkpoint), where training stood, and how a stopped run ends (one line,
an exit status)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from .checkpoint import Checkpointer, CorruptCheckpoint, complete_steps
from .fileio import WriteError, to_strict_json
from .interrupts import exit_code, signal_name
from .rundir import RESUMABLE_DIFFERENTLY
from .steps import TrainState

if TYPE_CHECKING:  # annotations only: task and train import this module
    from .config import GPTConfig
    from .settings import TrainerSettings
    from .task import Run, Task

def hash_arrays(*arrays: Any) -> str:
    """sha256 over arrays' dtypes, shapes and bytes (for `Task.data_hash`)."""
    digest = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(np.asarray(array))
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def fingerprint(tree: Any, samples: int = 4096) -> str:
    """hash_arrays over each leaf's shape and about `samples` of its values, evenly strided (None
    leaves skipped): other weights (another checkpoint at the same --model path) differ in
    nearly every value; computed on the device, transferring little."""
    parts = []
    for leaf in jax.tree_util.tree_leaves(tree):
        flat = leaf.reshape(-1)
        parts += [np.asarray(leaf.shape), flat[:: max(1, flat.size // samples)]]
    return hash_arrays(*parts)


class TrainingStopped(Exception):
    """Training stopped before its end; `exit_code` is the command's exit status and
    str() is one line."""

    exit_code = 1


class Interrupted(TrainingStopped):
    """SIGINT / SIGTERM: the run finished its step and wrote a checkpoint (when it has a
    checkpoint directory)."""

    def __init__(self, step: int, signum: int, checkpointed: bool) -> None:
        self.step, self.signum, self.checkpointed = step, signum, checkpointed
        self.exit_code = exit_code(signum)
        what = "checkpoint written" if checkpointed else "no checkpoint (no checkpoint directory)"
        super().__init__(f"interrupted at step {step} ({signal_name(signum)}); {what}")


class NonFiniteLoss(TrainingStopped):
    """A training step's loss or gradient norm was NaN or infinite."""

    exit_code = 1

    def __init__(self, step: int, value: float, last_checkpoint: int | None, what: str = "training loss") -> None:
        self.step, self.loss, self.last_checkpoint = step, value, last_checkpoint
        good = f"last good checkpoint at step {last_checkpoint}" if last_checkpoint is not None else "no checkpoint"
        super().__init__(f"non-finite {what} ({value}) at step {step}; {good}")


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(to_strict_json(value), allow_nan=False))


def _first_difference(saved: Any, current: Any, path: str = "") -> str | None:
    """The dotted name of the first setting that differs (None: equal), apart from those a run
    may resume with other values (`rundir.RESUMABLE_DIFFERENTLY`, at any depth)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted((set(saved) | set(current)) - RESUMABLE_DIFFERENTLY):
            name = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in current:
                return name
            diff = _first_difference(saved[key], current[key], name)
            if diff is not None:
                return diff
        return None
    return None if saved == current else (path or "settings")


@dataclass
class Position:
    """Where training is: `epoch`, `batch` (batches of that epoch done; its epoch_end not
    yet run) and the initial evaluation's metrics."""

    epoch: int = 0
    batch: int = 0
    initial: dict[str, Any] = field(default_factory=dict)


def _devices(run: Run) -> str:
    """The devices a run computes on, as a note names them ("1 device", "mesh data=4,fsdp=2")."""
    return "1 device" if run.mesh is None else "mesh " + ",".join(f"{axis}={size}" for axis, size in run.mesh.shape.items())


class Checkpoints:
    """`fit`'s use of jaxft.checkpoint.Checkpointer: the state's arrays and the run's record."""

    def __init__(self, directory: Path, settings: TrainerSettings, record: dict[str, Any], task: Task, frozen_hash: str | None = None,
                 config: GPTConfig | None = None) -> None:
        self.checkpointer = Checkpointer(directory, keep=settings.keep, async_save=True)
        self.record = _normalised(record)
        self.data_hash = task.data_hash()
        self.data_hashes = task.data_hashes()  # by a name that says where the split comes from
        # the model as read from --model's content (its path alone is in the settings), after the recipe's head/LoRA
        self.model_config = _normalised(config.to_dict()) if config is not None else None
        self.frozen_hash = frozen_hash  # `fingerprint` of the frozen parameters: reloaded from --model, not saved
        self.last: int | None = None  # the newest checkpoint's step
        self.last_position: tuple[int, int] | None = None  # and its (epoch, batch): at an epoch's end both change

    @staticmethod
    def arrays(state: TrainState) -> dict[str, Any]:
        return {"trainable": state.trainable, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}

    def save(self, run: Run, task: Task, position: Position) -> None:
        step = run.history.total_steps
        meta = {
            "epoch": position.epoch,
            "batch": position.batch,
            "global_step": step,
            "history": dataclasses.asdict(run.history),
            "initial": position.initial,
            "task": task.state_dict(),
            "settings": self.record,
            "data_hash": self.data_hash,
            "data_hashes": self.data_hashes,
            "model_config": self.model_config,
            "frozen_hash": self.frozen_hash,
            "devices": _devices(run),
        }
        self.checkpointer.save(step, self.arrays(run.state), meta)
        self.last, self.last_position = step, (position.epoch, position.batch)

    def restore(self, run: Run, task: Task) -> Position | None:
        """Continue from the newest checkpoint that verifies (None: there is none, a resume
        starts from step 0); a corrupt one is reported and skipped; refuses a checkpoint of
        other settings, model or data, and a directory whose every checkpoint is corrupt."""
        directory = self.checkpointer.directory
        steps = self.checkpointer.all_steps()
        if not steps:
            run.log(f"note: {directory} holds no checkpoint to resume from: the run starts over from step 0")
            return None
        corrupt: list[CorruptCheckpoint] = []
        for step in reversed(steps):
            try:
                arrays, meta = self.checkpointer.restore(step, self.arrays(run.state))
                break
            except CorruptCheckpoint as exc:
                run.log(f"warning: {exc}; skipped")
                corrupt.append(exc)
        else:
            raise ValueError(f"cannot resume: no checkpoint in {directory} verifies ({'; '.join(f'step {e.step}: {e.reason}' for e in corrupt)}); "
                             "pass --overwrite to start over")
        self._check_same_run(directory / str(step), meta)
        if corrupt:
            run.log(f"note: resuming from step {step}, the newest checkpoint that verifies (skipped: step {', '.join(str(e.step) for e in corrupt)})")
        here = _devices(run)
        if meta.get("devices", here) != here:
            run.log(f"note: resuming on {here} where the checkpoint was written on {meta['devices']}: the same "
                    "computation, but summed in another order (not bit for bit the run that was not stopped)")
        run.state = run.state._replace(**arrays)
        run.history = type(run.history)(**meta["history"])
        task.load_state_dict(meta.get("task") or {})
        self.last, self.last_position = step, (int(meta["epoch"]), int(meta["batch"]))
        return Position(int(meta["epoch"]), int(meta["batch"]), dict(meta.get("initial") or {}))

    def _check_same_run(self, where: Path, meta: dict[str, Any]) -> None:
        """Refuse (one line) a checkpoint of other settings, another model, other data or other frozen weights."""
        diff = _first_difference(meta.get("settings"), self.record)
        if diff is not None:
            raise ValueError(f"cannot resume from {where}: setting {diff} differs from the checkpoint's")
        if self.model_config is not None:
            diff = _first_difference(meta.get("model_config") or {}, self.model_config)
            if diff is not None:
                then = (meta.get("model_config") or {}).get(diff, "unrecorded")
                raise ValueError(f"cannot resume from {where}: the model's {diff} is {self.model_config.get(diff)}, the checkpoint's "
                                 f"{then} (--model's file changed); resume with the model the run began with")
        saved = meta.get("data_hashes") or {"training data": meta.get("data_hash")}
        for name in sorted(set(saved) | set(self.data_hashes), key=lambda name: (not name.startswith("train"), name)):
            if saved.get(name) != self.data_hashes.get(name):
                raise ValueError(f"cannot resume from {where}: the {name} differs from the checkpoint's (another data hash)")
        if None not in (meta.get("frozen_hash"), self.frozen_hash) and meta["frozen_hash"] != self.frozen_hash:
            raise ValueError(f"cannot resume from {where}: the frozen parameters differ from the run's "
                             "(--model now holds other weights); resume with the weights the run began with")

    def last_good(self) -> int | None:
        """The newest checkpoint on disk that this run wrote or verified, all of its values finite
        (what a stop names as "last good": never one it skipped as corrupt)."""
        try:
            self.checkpointer.wait()
        except WriteError:
            pass  # that save is not good; close() reports it
        on_disk = set(complete_steps(self.checkpointer.directory))
        good = [step for step, finite in self.checkpointer.finite.items() if finite and step in on_disk]
        return max(good) if good else None

    def wait(self) -> None:
        self.checkpointer.wait()

    def close(self) -> None:
        self.checkpointer.close()
