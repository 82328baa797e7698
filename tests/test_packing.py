"""Sequence packing: placement, round trips, and the packed trunk equals the unpacked one."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxft import packing, trunk
from jaxft.config import GPTConfig
from jaxft.model import init_params

TINY = GPTConfig(vocab_size=500, context_length=32, emb_dim=32, n_layers=3, n_heads=4)


def test_pack_places_every_sequence_once_without_overlap():
    widths = np.random.RandomState(0).randint(1, 21, 300)
    p = packing.pack(widths, 20)
    taken = np.zeros((p.rows, 20), np.int64)
    for r, a, w in zip(p.row, p.offset, p.width):
        assert 0 <= a and a + w <= 20
        taken[r, a : a + w] += 1
    assert taken.max() == 1 and taken.sum() == widths.sum()
    assert p.rows >= -(-widths.sum() // 20) and p.fill > 0.95  # first fit decreasing: near the bound
    assert packing.pack(np.array([20, 20, 1]), 20).rows == 3


def test_pack_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="1..20"):
        packing.pack(np.array([5, 21]), 20)
    with pytest.raises(ValueError, match="1..20"):
        packing.pack(np.array([0, 3]), 20)


def test_packed_rows_round_trip():
    rs = np.random.RandomState(1)
    widths = rs.randint(1, 9, 25)
    tokens = rs.randint(1, 500, (25, 8)).astype(np.int32)
    p = packing.pack(widths, 8)
    rows = packing.packed_rows(tokens, p, pad_id=0)
    assert rows["tokens"].shape == rows["positions"].shape == rows["segments"].shape == (p.rows, 8)
    back = np.full((25, 8), -1, np.int32)
    packing.unpack(rows["tokens"], p, back, slice(0, p.rows))
    for i, w in enumerate(widths):
        np.testing.assert_array_equal(back[i, :w], tokens[i, :w])
        assert (back[i, w:] == -1).all()
        r, a = p.row[i], p.offset[i]
        np.testing.assert_array_equal(rows["positions"][r, a : a + w], np.arange(w))
        assert len(set(rows["segments"][r, a : a + w])) == 1 and rows["segments"][r, a] > 0
    assert ((rows["segments"] == 0) == (rows["tokens"] == 0)).all()  # tokens are never 0: empty slots are


@pytest.mark.parametrize("n_blocks", [1, 3])
def test_packed_trunk_features_equal_each_sequence_alone(n_blocks):
    params = init_params(TINY, jax.random.PRNGKey(0))
    rs = np.random.RandomState(2)
    widths = rs.randint(1, 17, 40)
    tokens = rs.randint(0, 500, (40, 16)).astype(np.int32)
    packed = trunk.trunk_features(TINY, params, tokens, n_blocks, widths=widths)
    alone = np.asarray(trunk.prefix_apply(TINY, params, tokens, n_blocks))  # every row unpacked, at full width
    for i, w in enumerate(widths):
        assert np.abs(packed[i, :w] - alone[i, :w]).max() <= 1e-6, i
        assert (packed[i, w:] == 0).all()
    assert trunk.trunk_pass(TINY, params, tokens, n_blocks, widths=widths)[1] == packing.pack(widths, 16).rows * 16 < 40 * 16
    assert trunk.trunk_pass(TINY, params, tokens, n_blocks)[1] == 40 * 16


def test_repeated_texts_are_computed_once():
    params = init_params(TINY, jax.random.PRNGKey(0))
    rs = np.random.RandomState(3)
    distinct = rs.randint(0, 500, (5, 16)).astype(np.int32)
    tokens = distinct[[0, 1, 0, 2, 3, 1, 4, 0]]
    widths = np.array([5, 9, 5, 16, 3, 9, 12, 5])
    for w in (None, widths):
        features = trunk.trunk_features(TINY, params, tokens, 2, widths=w)
        alone = np.asarray(trunk.prefix_apply(TINY, params, tokens, 2))
        assert features.shape == (8, 16, 32)
        for i in range(8):
            cut = 16 if w is None else w[i]
            assert np.abs(features[i, :cut] - alone[i, :cut]).max() <= 1e-6
        np.testing.assert_array_equal(features[0], features[2])
        np.testing.assert_array_equal(features[0], features[7])
    assert trunk.trunk_pass(TINY, params, tokens, 2)[1] == 5 * 16  # 5 distinct texts of 8
    assert trunk.trunk_pass(TINY, params, tokens, 2, widths=widths)[1] == packing.pack(np.array([5, 9, 16, 3, 12]), 16).rows * 16
