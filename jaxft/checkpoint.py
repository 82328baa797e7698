"""Training checkpoints (orbax-checkpoint): the arrays to continue a run bitwise, plus a
JSON record of where the run was.

Layout under `directory` (e.g. OUT/checkpoints), one subdirectory per saved step:

    <step>/state/   the arrays (OCDBT/Zarr via TensorStore; each process writes its shards)
    <step>/meta/    the JSON record (`meta/metadata`; written by the primary process)
    <step>/commit_success.txt, <step>/_CHECKPOINT_METADATA

A step is written as `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once every
process has finished (`commit_success.txt` is written just before the rename): a crash
mid-save leaves only a temporary directory, which `latest_step` never returns and the next
`Checkpointer` on the directory removes.

The state is any pytree of arrays; leaves that are None (the frozen half of a split
parameter tree) are not stored and come back as None from the structure of `like`.

Every checkpoint's record holds a digest of its arrays (jaxft.digest, computed on the device
before the save); `restore` recomputes it from the restored arrays: a checkpoint whose files
were changed, cut or removed is a one-line `CorruptCheckpoint`, never silently other weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import distributed
from .digest import digest
from .fileio import WriteError, to_strict_json

PyTree = Any


class CheckpointMismatch(ValueError):
    """The checkpoint holds a differently shaped state (another model or --trainable); one line."""


class CorruptCheckpoint(ValueError):
    """A checkpoint that cannot be read back as it was written (files changed, cut or missing;
    its record unreadable); str() is one line naming its step and directory."""

    def __init__(self, step: int, directory: Path, reason: str) -> None:
        self.step, self.directory, self.reason = step, directory, reason
        super().__init__(f"the checkpoint of step {step} in {directory} is corrupt: {reason}")

# Space a checkpoint needs beyond its arrays' bytes: TensorStore's index and files, the JSON record.
SPACE_MARGIN = 1.05, 1 << 20
_OS_REASONS = re.compile(r"No space left on device|Disk quota exceeded|Permission denied|Read-only file system")

DIGEST_KEY = "arrays_digest"  # in the JSON record: jaxft.digest of the arrays as saved
COMMIT_FILE = "commit_success.txt"  # orbax's completeness marker, present in every finished step
_STATE, _META = "state", "meta"


class _OrbaxTracebacks(logging.Filter):
    """Drops the tracebacks orbax logs of a failed save or restore: the failure reaches the
    caller as one line (WriteError, CorruptCheckpoint); a full disk printed ~190 lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "orbax" not in record.pathname:
            return True
        # (an unreadable _CHECKPOINT_METADATA, orbax's timestamps: restoring needs none of it)
        return not (record.exc_info or str(record.msg).startswith("Failed to json parse Metadata file"))


_ORBAX_TRACEBACKS = _OrbaxTracebacks()


def _short(exc: BaseException) -> str:
    """An exception as a short phrase: the innermost cause (TensorStore's own error, where orbax
    wraps it in a page of specs), without TensorStore's bracketed spec and source locations."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = " ".join(str(exc).split())
    text = re.split(r" \[(?:tensorstore_spec|source locations)=", text)[0] or type(exc).__name__
    if isinstance(exc, json.JSONDecodeError):
        text = f"a JSON file of it does not parse ({text})"
    return text if len(text) <= 300 else text[:300] + "..."


def complete_steps(directory: str | Path) -> list[int]:
    """The steps of the complete checkpoints in `directory`, oldest first, read from the
    directory listing alone (no orbax import: cheap enough for checking a run directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / COMMIT_FILE).is_file())


def _name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _named_leaves(tree: PyTree) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """(names, leaves, treedef): None leaves are empty subtrees in JAX, so they drop out."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [tuple(_name(e) for e in path) for path, _ in with_paths]
    return names, [leaf for _, leaf in with_paths], treedef


def _nest(names: list[tuple[str, ...]], leaves: list[Any]) -> dict[str, Any]:
    """A nested dict of string keys: orbax stores it under readable names such as
    `trainable.h_11.attn.c_attn.kernel` and `opt_state.0.mu.cls_head.kernel`."""
    root: dict[str, Any] = {}
    for name, leaf in zip(names, leaves):
        if not name:
            name = ("value",)  # the whole state is one array
        node = root
        for part in name[:-1]:
            node = node.setdefault(part, {})
        node[name[-1]] = leaf
    return root


def _unnest(root: dict[str, Any], names: list[tuple[str, ...]]) -> list[Any]:
    out = []
    for name in names:
        node = root
        for part in name or ("value",):
            node = node[part]
        out.append(node)
    return out


def _storable(leaf: Any) -> Any:
    # typed PRNG keys (jax.random.key) are stored as their raw uint32 data
    return jax.random.key_data(leaf) if _is_key(leaf) else leaf


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    """What to restore a leaf of `like` as: its shape, dtype and sharding."""
    if _is_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:  # a NumPy array or an abstract leaf without placement
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


def _from_storage(stored: jax.Array, like: Any) -> Any:
    if isinstance(like, jax.Array) and not getattr(like, "_committed", True):
        # orbax places arrays explicitly (committed); a jitted step compiles separately for
        # committed and uncommitted inputs, so match `like` to keep one compilation
        stored = jax.device_put(np.asarray(stored))
    if _is_key(like):
        return jax.random.wrap_key_data(stored, impl=jax.random.key_impl(like))
    return stored


class Checkpointer:
    """Numbered checkpoints of a training state in `directory`, the newest `keep` kept.

    With `async_save`, `save` returns once the arrays are copied off the accelerator and
    writes in a background thread (the next `save`, `wait` or `close` waits for it); the
    caller may donate or overwrite the state right after `save` returns.
    """

    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True) -> None:
        import orbax.checkpoint as ocp  # imported here: importing jaxft stays light

        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self._ocp = ocp
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save that a crash interrupted
            create=True,
        )
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}  # known before any save
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.finite: dict[int, bool] = {}  # steps saved or restored here: whether every float value was finite
        self._pending: int | None = None  # the step a background save is writing
        if _ORBAX_TRACEBACKS not in logging.getLogger("absl").filters:
            logging.getLogger("absl").addFilter(_ORBAX_TRACEBACKS)

    def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
        """Save `state` (a pytree of arrays; None leaves allowed) and `meta` (JSON-able;
        NaN/inf become null) as checkpoint `step`.

        Checkpoints numbered `step` or later are deleted first: they belong to a run that
        was restored to an earlier step and continued, so they are no longer its future.
        """
        self.wait()
        self._manager.reload()
        for later in [s for s in self._manager.all_steps() if s >= step]:
            self._manager.delete(later)
        names, leaves, _ = _named_leaves(state)
        leaves = [_storable(leaf) for leaf in leaves]
        self._check_space(sum(np.dtype(leaf.dtype).itemsize * int(np.prod(np.shape(leaf))) for leaf in leaves))
        stored = _nest(names, leaves)
        hexdigest, self.finite[int(step)] = digest(names, leaves)  # of the arrays as they are saved
        record = {**to_strict_json(meta), DIGEST_KEY: hexdigest}
        args = self._ocp.args.Composite(**{_STATE: self._ocp.args.StandardSave(stored), _META: self._ocp.args.JsonSave(record)})
        self._pending = int(step)
        with self._as_write_error():
            self._manager.save(int(step), args=args, force=True)  # the caller decides when to save

    def _check_space(self, nbytes: int) -> None:
        """Refuse up front a checkpoint the disk has no room for: a save that runs out of space
        fails inside orbax's threads, with pages of their tracebacks before the error."""
        needed = nbytes * SPACE_MARGIN[0] + SPACE_MARGIN[1]
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise WriteError(self.directory, f"No space left on device: a checkpoint needs about {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free")

    @contextlib.contextmanager
    def _as_write_error(self) -> Iterator[None]:
        """A failed write (raised by orbax/TensorStore as ValueError or OSError, in a long message)
        as one-line WriteError naming the directory: the CLI then exits 1, not 2."""
        try:
            yield
        except Exception as exc:  # anything failing a save means the checkpoint was not written
            text = " ".join(str(exc).split())
            known = _OS_REASONS.search(text)
            self._remove_unfinished()
            raise WriteError(self.directory, known.group(0) if known else text[:300]) from exc

    def _remove_unfinished(self) -> None:
        """Delete what a failed save wrote: on a full disk, the space that run.json needs to
        record the failure (the earlier checkpoints stay)."""
        if self._pending is not None:
            for tmp in self.directory.glob(f"{self._pending}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
            self._pending = None

    def all_steps(self) -> list[int]:
        """The complete checkpoints' steps, oldest first."""
        self._manager.reload()  # another process (or an earlier run) may have written some
        complete = set(complete_steps(self.directory))
        return sorted(s for s in self._manager.all_steps() if s in complete)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None, like: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """(state, meta) of checkpoint `step` (None: the latest), restored into the
        structure, dtypes and shardings of `like` (arrays or jax.ShapeDtypeStruct leaves;
        None leaves stay None). Raises FileNotFoundError when there is no such checkpoint,
        CheckpointMismatch when its arrays' names, shapes or dtypes differ from `like`'s,
        CorruptCheckpoint when it cannot be read or its arrays do not match their digest."""
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.directory}: no complete checkpoint")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint for step {step}")
        names, like_leaves, treedef = _named_leaves(like)
        abstract = [_abstract(leaf) for leaf in like_leaves]
        try:
            self._check_matches(step, names, abstract)
            target = _nest(names, abstract)
            args = self._ocp.args.Composite(**{_STATE: self._ocp.args.StandardRestore(target), _META: self._ocp.args.JsonRestore()})
            restored = self._manager.restore(int(step), args=args)
            stored, meta = _unnest(restored[_STATE], names), restored[_META]
            if not isinstance(meta, dict):
                raise ValueError(f"its record is {type(meta).__name__}, not a JSON object")
            meta = dict(meta)
            saved = meta.pop(DIGEST_KEY, None)
            if not isinstance(saved, str):
                raise ValueError("its record holds no digest of its arrays")
            problem, cause = None, None
        except CheckpointMismatch:
            raise
        except Exception as exc:  # orbax/TensorStore fail in many ways on damaged files, each at length
            problem, cause = _short(exc), exc
        # each process reads its own shards: one that cannot makes the checkpoint corrupt for all,
        # agreed before the digest (a computation every process takes part in)
        if distributed.any_process(int(problem is not None)):
            raise CorruptCheckpoint(int(step), self.directory, problem or "another process could not read its shards") from cause
        hexdigest, self.finite[int(step)] = digest(names, stored)
        if hexdigest != saved:
            raise CorruptCheckpoint(int(step), self.directory, "its arrays differ from the digest saved with them (changed files)")
        leaves = [_from_storage(x, l) for x, l in zip(stored, like_leaves)]
        return jax.tree_util.tree_unflatten(treedef, leaves), meta

    def _check_matches(self, step: int, names: list[tuple[str, ...]], abstract: list[jax.ShapeDtypeStruct]) -> None:
        """One line naming what differs when `like` is not the saved state's shape: orbax
        would otherwise cast a dtype silently (no longer bitwise) or fail at length."""
        stored: dict[tuple[str, ...], Any] = {}

        def walk(node: Any, prefix: tuple[str, ...]) -> None:
            if isinstance(node, dict):
                for key, child in node.items():
                    walk(child, (*prefix, str(key)))
            else:
                stored[prefix] = node

        walk(self._manager.item_metadata(step)[_STATE].tree, ())
        expected = {name or ("value",): leaf for name, leaf in zip(names, abstract)}

        def describe(x: Any) -> str:
            return f"{np.dtype(x.dtype).name}{list(x.shape)}"

        problems = []
        for name in sorted(set(stored) | set(expected)):
            label = ".".join(name)
            if name not in expected:
                problems.append(f"{label}: in the checkpoint, not in the state")
            elif name not in stored:
                problems.append(f"{label}: not in the checkpoint")
            elif tuple(stored[name].shape) != tuple(expected[name].shape) or np.dtype(stored[name].dtype) != np.dtype(expected[name].dtype):
                problems.append(f"{label}: stored {describe(stored[name])}, expected {describe(expected[name])}")
        if problems:
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise CheckpointMismatch(
                f"{self.directory / str(step)}: does not match the state to restore: {'; '.join(problems[:3])}{more}"
            )

    def wait(self) -> None:
        """Block until a background save has finished (its checkpoint is then complete); a
        save that failed raises WriteError here."""
        with self._as_write_error():
            self._manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Finish any background save and release the manager's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
