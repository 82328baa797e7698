"""NumPy mini-batches with an explicit seed, for any tuple/list/dict of equally long arrays.

The shuffle order depends only on (seed, epoch), so a run can be replayed from any epoch; pass a
`np.random.Generator` instead to draw from a stream you own.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence, TypeVar, Union

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


def pad_rows(batch: dict[str, np.ndarray], batch_size: int, fill: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Pad every array of a short (final) batch to `batch_size` rows with `fill[key]`, so a
    run compiles each step once per shape."""
    n = len(next(iter(batch.values())))
    if n == batch_size:
        return batch
    if n > batch_size:
        raise ValueError(f"batch of {n} rows is larger than the batch size {batch_size}")
    out = {}
    for key, value in batch.items():
        pad = np.full((batch_size - n, *value.shape[1:]), fill[key], dtype=value.dtype)
        out[key] = np.concatenate([value, pad])
    return out


PADDINGS = ("longest", "batch", "bucket")
BUCKET_MULTIPLE = 16


def classification_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    epoch: int = 0,
    padding: str = "longest",
    pad_id: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Classification batches {tokens [B, T], labels, lengths, weights}; a short final batch is
    padded with weight-0 rows.

    padding: "longest" keeps the arrays' width (the longest training text: one shape for the
    whole run, the reference's); "batch" cuts each batch to its longest text; "bucket" to that
    rounded up to a multiple of 16 (few shapes, little padding).

    `arrays` may carry "hidden" [N, T, D] (a cached frozen trunk, jaxft.trunk) in place of
    "tokens": it is batched, cut and padded (with zeros) the same way.
    """
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; choose one of: {', '.join(PADDINGS)}")
    key = "hidden" if "hidden" in arrays else "tokens"
    width_all = arrays[key].shape[1]
    arrays = {**arrays, "weights": np.ones(len(arrays[key]), np.float32)}
    fill = {"tokens": pad_id, "hidden": 0.0, "labels": 0, "lengths": 1, "weights": 0.0}
    for batch in batches(arrays, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, epoch=epoch):
        if padding != "longest":
            multiple = BUCKET_MULTIPLE if padding == "bucket" else 1
            width = min(-(-int(batch["lengths"].max()) // multiple) * multiple, width_all)
            batch = {**batch, key: batch[key][:, :width]}
        yield pad_rows(batch, batch_size, fill)
