"""An exact digest of a pytree of arrays, computed where the arrays live (jaxft.checkpoint
records one with every checkpoint and checks it on restore).

Each value's bits, mixed with its position, are summed in uint32 arithmetic: wrapping integer
addition is associative and commutative, so the sums are the same however the arrays are
sharded and in whatever order a device reduces them (a mesh at save, one device at restore).
A change to any one value always changes the first sum (the mixing is a bijection); two
independent sums make a chance collision of several changes about 2**-64. Only two uint32
numbers per array leave the device.
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
    """The array's bits as a flat uint32 vector (8- and 16-bit values widened, 64-bit split)."""
    if x.dtype == jnp.bool_:
        return x.reshape(-1).astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    bits = jax.lax.bitcast_convert_type(x, unsigned)  # 64-bit: a trailing axis of 2
    return bits.reshape(-1).astype(jnp.uint32)


def _leaf_sums(x: jax.Array, salt: jax.Array) -> jax.Array:
    bits = _as_uint32(x)
    position = jnp.arange(bits.size, dtype=jnp.uint32) * _GOLDEN + salt
    term = _fmix(bits ^ _fmix(position))
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack([jnp.sum(term, dtype=jnp.uint32), jnp.sum(_fmix(term ^ _GOLDEN), dtype=jnp.uint32), finite.astype(jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _summer(out_sharding: Any) -> Any:
    # one jit per output placement; XLA compiles it once per leaf shape, dtype and sharding
    return jax.jit(_leaf_sums, out_shardings=out_sharding)


def _replicated(leaf: Any) -> Any:
    """A sharding that puts the sums on every device of `leaf`'s mesh (each process reads them)."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


def _host(sums: jax.Array) -> np.ndarray:
    if sums.is_fully_addressable:
        return np.asarray(sums)
    return np.asarray(sums.addressable_data(0))  # replicated: this process's copy is the whole value


def digest(names: Sequence[tuple[str, ...]], leaves: Sequence[Any]) -> tuple[str, bool]:
    """(hex digest, every floating value finite) of the arrays `leaves` named `names`: the
    same for the same values under any sharding; differs when any value, name, shape or dtype
    differs."""
    sums = [_summer(_replicated(leaf))(leaf, np.uint32(i)) for i, leaf in enumerate(leaves)]
    out = hashlib.sha256()
    finite = True
    for name, leaf, s in zip(names, leaves, sums):
        values = _host(s)
        finite = finite and bool(values[2])
        out.update(f"{'.'.join(name)}|{np.dtype(leaf.dtype).str}|{tuple(np.shape(leaf))}|{int(values[0])},{int(values[1])};".encode())
    return out.hexdigest(), finite
