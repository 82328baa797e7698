"""Sequence packing: many short sequences in one row, each attending only to itself.

Used by the frozen-trunk cache (jaxft.trunk) for poolings that read only a row's real tokens:
1,494 SMS texts of 30.6 tokens on average fill 386 rows of 120 instead of 1,494, with one
compiled shape; by its cached training batches (`pack_pooled_batch`); and by instruction batches
(`pack_lm_batch`, `finetune-instruct --pack`): each step's examples in as few rows as fit, the
same examples and the same loss per step. In a packed row every sequence keeps its own
positions (0, 1, ...) and a segment id; the attention mask is causal within a segment and
closed across segments, so each token's output is that of its sequence alone (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Packing:
    """Where each sequence i lies: row[i], columns offset[i] .. offset[i] + width[i]."""

    row: np.ndarray  # [N] int
    offset: np.ndarray  # [N] int
    width: np.ndarray  # [N] int
    rows: int  # packed rows
    row_width: int

    @property
    def fill(self) -> float:
        """Fraction of packed slots holding a token."""
        return float(self.width.sum()) / max(self.rows * self.row_width, 1)


def pack(widths: np.ndarray, row_width: int) -> Packing:
    """First-fit decreasing: sequences of `widths` (each 1..row_width) into rows of `row_width`."""
    widths = np.asarray(widths, np.int64)
    if widths.ndim != 1 or (widths.size and (widths.min() < 1 or widths.max() > row_width)):
        raise ValueError(f"widths must be a vector of values in 1..{row_width}")
    row, offset = np.zeros(len(widths), np.int64), np.zeros(len(widths), np.int64)
    free = np.zeros(len(widths), np.int64)  # free columns per row (at most one row per sequence)
    rows = 0
    for i in np.argsort(-widths, kind="stable"):
        fits = free[:rows] >= widths[i]
        r = int(fits.argmax()) if fits.any() else rows  # the first row with room, else a new one
        if r == rows:
            free[r], rows = row_width, rows + 1
        row[i], offset[i] = r, row_width - free[r]
        free[r] -= widths[i]
    return Packing(row, offset, widths, rows, row_width)


def packed_rows(tokens: np.ndarray, packing: Packing, pad_id: Any = 0, dtype: Any = np.int32) -> dict[str, np.ndarray]:
    """The packed arrays, each [rows, row_width]: tokens (pad_id in empty slots; `tokens` [N, T, ...]
    may carry trailing dimensions, which the packed tokens keep, in `dtype`), positions (0.. within
    each sequence) and segments (1.. per sequence within its row, 0 = empty)."""
    shape = (packing.rows, packing.row_width)
    out = {"tokens": np.full(shape + tokens.shape[2:], pad_id, dtype), "positions": np.zeros(shape, np.int32), "segments": np.zeros(shape, np.int32)}
    segment = np.zeros(packing.rows, np.int32)
    for i in range(len(packing.width)):
        r, a, w = packing.row[i], packing.offset[i], packing.width[i]
        segment[r] += 1
        out["tokens"][r, a : a + w] = tokens[i, :w]
        out["positions"][r, a : a + w] = np.arange(w)
        out["segments"][r, a : a + w] = segment[r]
    return out


def unpack(packed: np.ndarray, packing: Packing, out: np.ndarray, rows: slice) -> None:
    """Copy the packed outputs of packed rows `rows` ([r, row_width, ...]) back to `out` [N, T, ...]
    (sequence i to out[i, :width[i]]); the rest of `out` is left as it is."""
    start, stop = rows.start, rows.stop
    for i in np.flatnonzero((packing.row >= start) & (packing.row < stop)):
        r, a, w = packing.row[i] - start, packing.offset[i], packing.width[i]
        out[i, :w] = packed[r, a : a + w]


def lm_lengths(targets: np.ndarray, ignore_index: int) -> np.ndarray:
    """Per row of next-token targets [B, T]: 1 + the column of its last non-ignored target (1 if none)."""
    real = targets != ignore_index
    return np.where(real.any(axis=1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 1)


def pack_lm_batch(
    inputs: np.ndarray, targets: np.ndarray, row_width: int, *, row_multiple: int = 1, pad_id: int, ignore_index: int
) -> dict[str, np.ndarray]:
    """A collated next-token batch (inputs, targets [B, T], each row an example padded at its end)
    packed into rows of `row_width`: {inputs, targets, positions, segments}, [R, row_width] with
    R a multiple of `row_multiple` (whole rows of padding added). Example i keeps its first L_i
    columns, L_i = 1 + its last non-ignored target (the columns after it predict nothing and no
    earlier column attends to them), so a loss averaged over the targets is unchanged."""
    packing = pack(lm_lengths(targets, ignore_index), row_width)
    rows = packed_rows(inputs, packing, pad_id)
    rows["inputs"], rows["targets"] = rows.pop("tokens"), packed_rows(targets, packing, ignore_index)["tokens"]
    extra = -packing.rows % row_multiple
    fill = {"inputs": pad_id, "targets": ignore_index, "positions": 0, "segments": 0}
    return {key: np.pad(rows[key], ((0, extra), (0, 0)), constant_values=fill[key]) for key in ("inputs", "targets", "positions", "segments")}


def choose_row_width(batch_lengths: list[np.ndarray], multiple: int) -> int:
    """The row width, a multiple of `multiple` between the longest sequence and twice that, that
    packs these batches (each a vector of sequence lengths, packed on its own) into the fewest
    slots; the narrowest such width on a tie."""
    longest = max(int(lengths.max()) for lengths in batch_lengths)
    low = -(-longest // multiple) * multiple
    best = None
    for width in range(low, 2 * low + 1, multiple):
        slots = sum(pack(lengths, width).rows for lengths in batch_lengths) * width
        if best is None or slots < best[0]:
            best = (slots, width)
    return best[1]


def reference_numel(segments: np.ndarray) -> int:
    """Of packed rows' segment ids [R, W]: the examples times the longest one's length, the size
    of the unpacked, tightly padded batch (the reference's `input_batch.numel()`)."""
    counts = [np.bincount(row)[1:] for row in segments]
    lengths = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    lengths = lengths[lengths > 0]
    return int(len(lengths) * lengths.max()) if len(lengths) else 0


def pack_pooled_batch(batch: dict[str, np.ndarray], widths: np.ndarray, row_width: int) -> dict[str, np.ndarray]:
    """A classification batch of cached trunk outputs ({hidden [B, T, D], labels, weights, ...})
    packed into rows of `row_width`: sequence i keeps its first widths[i] positions, and the
    classifier reads the last of them. Returns {hidden [R, row_width, D], segments [R, row_width],
    pool_row, pool_index, labels, weights} (the last four [B]), for steps.classification_metrics."""
    packing = pack(widths, row_width)
    rows = packed_rows(batch["hidden"], packing, 0.0, batch["hidden"].dtype)
    return {"hidden": rows["tokens"], "segments": rows["segments"], "pool_row": packing.row.astype(np.int32),
            "pool_index": (packing.offset + packing.width - 1).astype(np.int32), "labels": batch["labels"], "weights": batch["weights"]}
