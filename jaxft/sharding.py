"""Many devices: a ("data", "fsdp") device mesh, sharding rules, sharded batches and steps.

The mesh has two axes over every global device (`jax.devices()`, all processes):

  data  pure data parallelism: each device sees its own rows of the batch, and holds
        whole copies of the parameters (as far as `fsdp` leaves them whole);
  fsdp  data parallelism that also splits the parameters and the optimizer state
        (fully sharded data parallel): every large matrix is cut into `fsdp` pieces along
        one dimension; XLA gathers a matrix where a step needs it whole.

A batch is split by rows over data x fsdp together, so every device computes on
B / (data x fsdp) rows; gradients are summed across all of them by XLA. A step on a
mesh computes what the one-device step computes: only the order of the floating-point
sums changes (losses agree to ~1e-6 relative).

Sharding rule for every array (parameters, the frozen tree, optimizer state alike,
decided by shape alone, so Adam's mu/nu follow their parameter):
  - ndim >= 2: split the largest dimension divisible by the fsdp size over "fsdp"
    (the first such on a tie; e.g. wte [V, d] along V, c_fc kernel [d, 4d] along 4d);
  - vectors, scalars, and matrices with no dimension divisible: replicated;
  - a leaf of stacked blocks (jaxft.stacking, axis 0 the layers): its layers' rule, axis 0
    whole (the scan slices one layer at a time; a sharded layer axis would gather them).
`None` leaves (the trainable/frozen split of jaxft.optim) stay None.

Typical use (one or many processes alike, see jaxft.distributed for the latter):

    mesh = make_mesh("data=4,fsdp=2")
    state = shard_tree(init_state(params, mask, optimizer), mesh)
    train_step, eval_step = make_steps(config, optimizer, "lm")
    train_step, eval_step = shard_steps(train_step, eval_step, mesh, state, batch_like)
    rows = process_rows(batch_size, mesh)       # this process loads batch[rows] only
    state, metrics = train_step(state, global_batch(local_rows, mesh))
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import stacking

AXES = ("data", "fsdp")
ROWS = P(AXES)  # a batch's leading (row) dimension over data x fsdp


# ----------------------------------------------------------------------------- the mesh


def parse_mesh(spec: str | None, num_devices: int | None = None) -> dict[str, int]:
    """{"data": n, "fsdp": m} from "data=8", "data=4,fsdp=2", "fsdp=8".

    An axis the spec leaves out has size 1. None or "" puts every device on `data`
    (`num_devices`, default: every global device). Sizes are checked against the
    device count by `make_mesh`, not here.
    """
    if spec is None or not spec.strip():
        return {"data": jax.device_count() if num_devices is None else num_devices, "fsdp": 1}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not name:
            raise ValueError(f"mesh {spec!r}: expected axis=size pairs such as data=4,fsdp=2")
        if name not in AXES:
            raise ValueError(f"mesh {spec!r}: unknown axis {name!r}; the axes are data and fsdp")
        if name in sizes:
            raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh {spec!r}: the size of {name!r} must be a positive integer, not {value!r}")
        sizes[name] = int(value)
    return {axis: sizes.get(axis, 1) for axis in AXES}


def describe(sizes: Mapping[str, int] | Mesh) -> str:
    """ "data=4,fsdp=2" for a mesh or a parse_mesh dict (axes of size 1 left out, but not both)."""
    if isinstance(sizes, Mesh):
        sizes = dict(sizes.shape)
    named = [f"{axis}={sizes[axis]}" for axis in AXES if sizes[axis] != 1]
    return ",".join(named) or "data=1"


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: every global device).

    The axis sizes must multiply to the number of devices exactly: a mesh that leaves
    devices idle is refused rather than silently using the first few. Devices are laid
    out in (process, id) order, so each process owns a contiguous block of batch rows.
    """
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = list(devices)
    sizes = parse_mesh(spec, len(devices))
    need = sizes["data"] * sizes["fsdp"]
    if need > len(devices):
        raise ValueError(f"mesh {describe(sizes)} needs {need} devices; {len(devices)} are available")
    if need < len(devices):
        raise ValueError(
            f"mesh {describe(sizes)} uses {need} of the {len(devices)} devices; "
            f"the axis sizes must multiply to {len(devices)}"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["fsdp"]), AXES)


# ----------------------------------------------------------------------------- parameters and optimizer state


def leaf_spec(shape: Sequence[int], fsdp: int) -> P:
    """The PartitionSpec of an array of `shape` (see the module docstring for the rule)."""
    if fsdp <= 1 or len(shape) < 2:
        return P()
    candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    _, neg_dim = max(candidates)
    dim = -neg_dim
    return P(*([None] * dim), "fsdp")


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every array leaf of `tree` (arrays or ShapeDtypeStructs); None stays None."""
    fsdp = mesh.shape["fsdp"]

    def spec(path, x):
        if stacking.is_stacked_path(path):
            return NamedSharding(mesh, P(None, *leaf_spec(np.shape(x)[1:], fsdp)))
        return NamedSharding(mesh, leaf_spec(np.shape(x), fsdp))

    return jax.tree_util.tree_map_with_path(spec, tree)


def shard_tree(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of `tree` on the mesh by the rule. With many processes every process
    must pass the same full values (e.g. the same seed or checkpoint); each keeps its shards."""
    shardings = tree_shardings(tree, mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def place(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, tree, shardings)


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over data x fsdp; every other dimension whole."""
    return NamedSharding(mesh, ROWS)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """One-line ValueError when the rows cannot be split evenly over the data-parallel devices."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % n:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {n} data-parallel devices "
            f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
        )


def process_rows(global_batch_size: int, mesh: Mesh) -> slice:
    """The contiguous rows of every global batch that this process loads.

    Processes load disjoint slices in process order, so the global batch is the batch a
    one-process run would use (the data order does not depend on the number of processes).
    """
    check_batch_size(global_batch_size, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values()})
    lo, hi = starts[0][0], starts[-1][1]
    if sum(stop - start for start, stop in starts) != hi - lo:
        raise ValueError(f"this process's devices do not hold contiguous batch rows on mesh {describe(mesh)}")
    return slice(lo, hi)


def global_batch(local_rows: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """One global batch from this process's rows (`batch[process_rows(B, mesh)]`; with one
    process, the whole batch), each array split by rows over data x fsdp."""
    arrays = {key: np.asarray(value) for key, value in local_rows.items()}
    lengths = {len(value) for value in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"batch arrays have different numbers of rows {sorted(lengths)}")
    global_rows = lengths.pop() * jax.process_count()
    check_batch_size(global_rows, mesh)
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(
            sharding, value.astype(jax.dtypes.canonicalize_dtype(value.dtype), copy=False), (global_rows, *value.shape[1:])
        )
        for key, value in arrays.items()
    }


# ----------------------------------------------------------------------------- steps


def shard_steps(
    train_step_fn: Callable,
    eval_step_fn: Callable,
    mesh: Mesh,
    state_like: Any,
    batch_like: Mapping[str, Any] | None = None,
) -> tuple[Callable, Callable]:
    """jit train_step(state, batch) and eval_step(params, batch) for `mesh`.

    The step functions are jaxft.train.make_steps's (jitted or not: a jitted one is
    unwrapped). The state is sharded by the rule (and donated), the batch by rows,
    metrics come back replicated. The state and params passed in must already be placed
    by `shard_tree` (the train step keeps them so) and batches built by `global_batch`.
    `state_like` is a TrainState of arrays or ShapeDtypeStructs; `batch_like`, when given,
    has its batch size checked against the mesh.
    """
    if batch_like is not None:
        check_batch_size(len(next(iter(batch_like.values()))), mesh)
    train_fn = getattr(train_step_fn, "__wrapped__", train_step_fn)
    eval_fn = getattr(eval_step_fn, "__wrapped__", eval_step_fn)
    state_shardings = tree_shardings(state_like, mesh)
    params_shardings = tree_shardings(state_like.params, mesh)
    rows, replicated = batch_sharding(mesh), NamedSharding(mesh, P())
    train_step = jax.jit(
        train_fn, in_shardings=(state_shardings, rows), out_shardings=(state_shardings, replicated), donate_argnums=0
    )
    eval_step = jax.jit(eval_fn, in_shardings=(params_shardings, rows), out_shardings=replicated)
    return train_step, eval_step


# ----------------------------------------------------------------------------- memory


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """Bytes of `tree`'s arrays held on each of this process's devices (its addressable shards)."""
    totals: dict[jax.Device, int] = collections.defaultdict(int)
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                totals[shard.device] += shard.data.nbytes
    return dict(totals)
