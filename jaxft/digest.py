"""An exact digest of a pytree of arrays, computed where the arrays live (jaxft.checkpoint
records one with every checkpoint and checks it on restore).

Each value's bits, mixed with its position in the whole array, are summed in uint32
arithmetic: wrapping integer addition is associative and commutative, so the sums are the same
however the arrays are sharded and in whatever order they are added (a mesh at save, one device
at restore). A change to any one value always changes the first sum (the mixing is a
bijection); two independent sums make a chance collision of several changes about 2**-64.

Each device sums the shards it holds (one copy of each: replica 0) with no collective, and
the processes add their partial sums in one all-gather at the end: a collective inside the
digest could interleave with orbax's own between processes and wait forever.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)


def _fmix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection of uint32 that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _as_uint32(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 of its shape (8- and 16-bit values widened; 64-bit values a
    trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@functools.partial(jax.jit, static_argnums=(1,))
def _shard_sums(x: jax.Array, global_shape: tuple[int, ...], offsets: jax.Array, salt: jax.Array) -> jax.Array:
    """[sum 1, sum 2, all finite] of one shard whose first element sits at `offsets` of an
    array of `global_shape` (the bits' shape, a trailing axis of 2 for 64-bit values)."""
    bits = _as_uint32(x)
    position = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):  # the element's flat index in the whole array
        position = position + (jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) + offsets[axis]) * np.uint32(stride % 2**32)
        stride *= global_shape[axis]
    term = _fmix(bits ^ _fmix(position * _GOLDEN + salt))
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack([jnp.sum(term, dtype=jnp.uint32), jnp.sum(_fmix(term ^ _GOLDEN), dtype=jnp.uint32), finite.astype(jnp.uint32)])


def _local_sums(leaf: Any, salt: int) -> list[jax.Array]:
    """The sums of the shards of `leaf` this process holds, one copy of each element in all."""
    if not isinstance(leaf, jax.Array):
        leaf = jnp.asarray(leaf)
    if leaf.is_fully_addressable and jax.process_index() != 0:
        return []  # a process-local array: each process holds all of it; process 0 counts it
    extra = (2,) if np.dtype(leaf.dtype).itemsize == 8 else ()
    global_shape = (*leaf.shape, *extra)
    sums = []
    for shard in leaf.addressable_shards:
        if shard.replica_id != 0:
            continue
        offsets = [index.start or 0 for index in shard.index] + [0] * len(extra)
        sums.append(_shard_sums(shard.data, global_shape, np.asarray(offsets, np.uint32), np.uint32(salt)))
    return sums


def digest(names: Sequence[tuple[str, ...]], leaves: Sequence[Any]) -> tuple[str, bool]:
    """(hex digest, every floating value finite, hyperparameters aside) of the arrays `leaves` named `names`: the
    same for the same values under any sharding and number of processes; differs when any
    value, name, shape or dtype differs. Every process must call it (one all-gather)."""
    per_leaf = [_local_sums(leaf, i) for i, leaf in enumerate(leaves)]  # dispatched before any waits
    totals = np.zeros((len(leaves), 3), np.uint32)
    totals[:, 2] = 1
    for row, sums in zip(totals, per_leaf):
        for s in sums:
            values = np.asarray(s)
            row[:2] += values[:2]  # uint32: wraps, as on the device
            row[2] &= values[2]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        gathered = np.asarray(multihost_utils.process_allgather(totals)).astype(np.uint32)  # [processes, leaves, 3]
        totals = np.concatenate([gathered[..., :2].sum(axis=0, dtype=np.uint32), gathered[..., 2:].min(axis=0)], axis=-1)
    out = hashlib.sha256()
    for name, leaf, (first, second, _) in zip(names, leaves, totals):
        out.update(f"{'.'.join(name)}|{np.dtype(leaf.dtype).str}|{tuple(np.shape(leaf))}|{int(first)},{int(second)};".encode())
    # finite: the model and the optimizer's moments; not the hyperparameters the optimizer state
    # carries (optim.adamw's injected lr: an lr beyond float32 is inf from step 0, on good weights)
    weights = [row[2] for name, row in zip(names, totals) if "hyperparams" not in name]
    return out.hexdigest(), bool(all(weights))
