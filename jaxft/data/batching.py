"""NumPy mini-batches with an explicit seed, for any tuple/list/dict of equally long arrays.

The shuffle order depends only on (seed, epoch), so a run can be replayed from any epoch; pass a
`np.random.Generator` instead to draw from a stream you own.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence, TypeVar, Union

import numpy as np

Arrays = Union[Sequence[np.ndarray], Mapping[str, np.ndarray]]
T = TypeVar("T", bound=Arrays)


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """How many batches `batches` yields for `n` examples."""
    _check_sizes(n, batch_size, drop_last)
    return n // batch_size if drop_last else -(-n // batch_size)


def _check_sizes(n: int, batch_size: int, drop_last: bool) -> None:
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, not {batch_size}")
    if n < 1:
        raise ValueError("no examples to batch (empty data set)")
    if drop_last and batch_size > n:
        # drop_last would silently yield nothing at all.
        raise ValueError(f"batch size {batch_size} is larger than the data ({n} examples) with drop_last")


def permutation(n: int, seed: int | np.random.Generator, epoch: int = 0) -> np.ndarray:
    """The shuffled order of `n` examples for `epoch` (a function of (seed, epoch) for an int seed)."""
    if isinstance(seed, np.random.Generator):
        return seed.permutation(n)
    if int(seed) < 0 or int(epoch) < 0:
        raise ValueError(f"seed and epoch must be >= 0, not {seed}, {epoch}")
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def _length(arrays: Arrays) -> int:
    values = list(arrays.values()) if isinstance(arrays, Mapping) else list(arrays)
    if not values:
        raise ValueError("no arrays to batch")
    lengths = {len(value) for value in values}
    if len(lengths) != 1:
        raise ValueError(f"arrays have different lengths {sorted(lengths)}")
    return lengths.pop()


def _take(arrays: Arrays, index: slice | np.ndarray) -> Arrays:
    if isinstance(arrays, Mapping):
        return {key: np.asarray(value)[index] for key, value in arrays.items()}
    taken = [np.asarray(value)[index] for value in arrays]
    return tuple(taken) if isinstance(arrays, tuple) else taken


def batches(
    arrays: T,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int | np.random.Generator | None = None,
    epoch: int = 0,
) -> Iterator[T]:
    """Yield batches with the same structure as `arrays` (tuple, list or dict of arrays).

    `shuffle=True` needs `seed`; with an int seed the order is `permutation(n, seed, epoch)`.
    `drop_last` drops a final partial batch (a batch size above the data size is an error).
    """
    n = _length(arrays)
    _check_sizes(n, batch_size, drop_last)
    if shuffle:
        if seed is None:
            raise ValueError("shuffle=True needs an explicit seed")
        order: np.ndarray | None = permutation(n, seed, epoch)
    else:
        order = None
    for b in range(num_batches(n, batch_size, drop_last)):
        window = slice(b * batch_size, min((b + 1) * batch_size, n))
        yield _take(arrays, window if order is None else order[window])
