"""NumPy batching: counts, order, seeds, structures and errors."""

from __future__ import annotations

import numpy as np
import pytest

from jaxft.data.batching import batches, num_batches, permutation


def test_num_batches_seed_figures():
    assert num_batches(1045, 8, drop_last=True) == 130
    assert num_batches(149, 8, drop_last=False) == 19
    assert num_batches(300, 8, drop_last=False) == 38
    assert num_batches(16, 8, drop_last=True) == num_batches(16, 8, drop_last=False) == 2


def test_batches_cover_data_in_order_without_shuffle():
    x = np.arange(21).reshape(21, 1)
    y = np.arange(21) * 10
    out = list(batches((x, y), 8, shuffle=False, drop_last=False))
    assert [len(b[1]) for b in out] == [8, 8, 5]
    assert isinstance(out[0], tuple)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in out]), y)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in out])[:, 0] * 10, y)


def test_shuffle_is_seeded_per_epoch_and_drops_last():
    data = {"tokens": np.arange(21) * 2, "labels": np.arange(21)}
    epoch0 = list(batches(data, 8, shuffle=True, drop_last=True, seed=123))
    assert len(epoch0) == 2 and all(set(b) == {"tokens", "labels"} for b in epoch0)
    assert all((b["tokens"] == 2 * b["labels"]).all() for b in epoch0)  # rows stay aligned
    seen = np.concatenate([b["labels"] for b in epoch0])
    assert len(set(seen.tolist())) == 16 and not (seen == np.arange(16)).all()
    np.testing.assert_array_equal(seen, permutation(21, 123, 0)[:16])
    again = np.concatenate([b["labels"] for b in batches(data, 8, shuffle=True, drop_last=True, seed=123)])
    np.testing.assert_array_equal(seen, again)
    epoch1 = np.concatenate([b["labels"] for b in batches(data, 8, shuffle=True, drop_last=True, seed=123, epoch=1)])
    assert not np.array_equal(seen, epoch1)


def test_generator_seed_advances():
    rng = np.random.default_rng(0)
    first = [b[0] for b in batches([np.arange(10)], 10, shuffle=True, drop_last=False, seed=rng)]
    second = [b[0] for b in batches([np.arange(10)], 10, shuffle=True, drop_last=False, seed=rng)]
    assert sorted(first[0].tolist()) == list(range(10)) and not np.array_equal(first[0], second[0])


def test_batching_errors():
    with pytest.raises(ValueError, match="batch size 32 is larger than the data \\(10 examples\\) with drop_last"):
        list(batches((np.arange(10),), 32, shuffle=True, drop_last=True, seed=1))
    with pytest.raises(ValueError, match="batch size 32 is larger"):
        num_batches(10, 32, drop_last=True)
    assert num_batches(10, 32, drop_last=False) == 1
    with pytest.raises(ValueError, match="explicit seed"):
        next(batches((np.arange(10),), 2, shuffle=True, drop_last=False))
    with pytest.raises(ValueError, match="different lengths"):
        next(batches((np.arange(10), np.arange(9)), 2, shuffle=False, drop_last=False))
    with pytest.raises(ValueError, match="empty data set"):
        next(batches((np.arange(0),), 2, shuffle=False, drop_last=False))
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        num_batches(10, 0, drop_last=False)
