"""Alpaca-style instruction data: load, validate, split, tokenise, collate, batch.

The file comes from `jaxft.sources.instruction_data_file` (bundled, or downloaded); the prompt
styles that turn an entry into text are in `jaxft.data.prompts`.

The collate function reproduces the reference's `custom_collate_fn` exactly (same values, NumPy
instead of torch). `collate_bucketed` adds padding up to a few bucket lengths so that a jitted
train step compiles only a handful of shapes; the extra positions carry the pad id in the
inputs and `ignore_index` in the targets, so a loss that ignores `ignore_index` is unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from jaxft.data.batching import num_batches, permutation

# Re-exported: the recipes, the CLI and the judge reach the prompt styles through this module.
from jaxft.data.prompts import (  # noqa: F401
    PROMPT_STYLES,
    PromptStyle,
    extract_response,
    format_entry,
    format_prompt,
    get_style,
    register_style,
)
from jaxft.losses import IGNORE_INDEX
from jaxft.tokenizer import PAD_ID, encode_text

DEFAULT_MAX_LENGTH = 1024

Entry = dict[str, Any]


class InstructionDataError(ValueError):
    """A problem with an instruction data file or entry; the message is one line."""


# --------------------------------------------------------------------------- loading


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def validate_entries(data: Any, source: str | Path = "<data>", *, require_output: bool = True) -> list[Entry]:
    """Check a parsed JSON value and return its entries as fresh dicts.

    Every entry must be an object whose `instruction` (and, if `require_output`, `output`) is a
    string; `input` is optional (absent or null is read as ""). Other fields are kept.
    """
    if not isinstance(data, list):
        raise InstructionDataError(f"{source}: expected a JSON list of entries, got {_type_name(data)}")
    if not data:
        raise InstructionDataError(f"{source}: the list of entries is empty")
    required = ("instruction", "output") if require_output else ("instruction",)
    entries: list[Entry] = []
    for index, item in enumerate(data):
        where = f"{source}: entry {index}"
        if not isinstance(item, dict):
            raise InstructionDataError(f"{where}: expected an object, got {_type_name(item)}")
        for field in required:
            if field not in item:
                raise InstructionDataError(f"{where}: missing required field '{field}'")
        entry = dict(item)
        if entry.get("input") is None:
            entry["input"] = ""
        for field in ("instruction", "input", "output"):
            if field in entry and not isinstance(entry[field], str):
                raise InstructionDataError(
                    f"{where}: field '{field}' must be a string, got {_type_name(entry[field])}"
                )
        entries.append(entry)
    return entries


def load_entries(path: str | Path, *, require_output: bool = True) -> list[Entry]:
    """Read and validate a JSON list of `{instruction, input, output}` entries."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a JSON file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not JSON
    except UnicodeDecodeError as exc:
        raise InstructionDataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise InstructionDataError(f"{path}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InstructionDataError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    return validate_entries(data, path, require_output=require_output)


class Splits(NamedTuple):
    train: list[Entry]
    test: list[Entry]
    validation: list[Entry]


def split_entries(entries: Sequence[Entry], train_frac: float = 0.85, test_frac: float = 0.10) -> Splits:
    """Split in order as the reference does: train first, then test, the rest is validation."""
    n = len(entries)
    n_train = int(n * train_frac)
    n_test = int(n * test_frac)
    entries = list(entries)
    return Splits(entries[:n_train], entries[n_train : n_train + n_test], entries[n_train + n_test :])


# --------------------------------------------------------------------------- tokenising


@dataclass(frozen=True)
class TokenizedInstructions:
    """Token ids of each entry's full text, and how many of them are the prompt."""

    token_ids: list[list[int]]
    prompt_lengths: list[int]
    n_over_length: int = 0  # entries longer than max_length (the collate truncates them)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int) -> list[int]:
        return self.token_ids[index]


def tokenize_entries(
    entries: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    style: str | PromptStyle = "alpaca",
    *,
    max_length: int | None = None,
    too_long: Literal["error", "truncate"] = "error",
    source: str | Path = "<data>",
) -> TokenizedInstructions:
    """Encode every entry's full text (prompt + response) with a tiktoken-like tokenizer.

    The prompt length is `len(encode(prompt_text))`, as the reference's instruction masking
    counts it. With `max_length` (the context length), a prompt longer than it raises an error
    naming `source` and the entry index; with `too_long="truncate"` such entries are kept and
    the collate's `allowed_max_length` truncates them. `n_over_length` counts every entry whose
    full text exceeds `max_length`.
    """
    if too_long not in ("error", "truncate"):
        raise ValueError(f"too_long must be 'error' or 'truncate', got {too_long!r}")
    style = get_style(style)

    token_ids, prompt_lengths, over = [], [], 0
    for index, entry in enumerate(entries):
        prompt, full = style.texts(entry)
        # A literal "<|endoftext|>" in the data stays ordinary text: no eos inside an example.
        ids, n_prompt = encode_text(tokenizer, full), len(encode_text(tokenizer, prompt))
        if max_length is not None:
            if n_prompt > max_length and too_long == "error":
                raise InstructionDataError(
                    f"{source}: entry {index}: prompt is {n_prompt} tokens, longer than the "
                    f"context length {max_length}"
                )
            over += len(ids) > max_length
        token_ids.append(ids)
        prompt_lengths.append(n_prompt)
    return TokenizedInstructions(token_ids, prompt_lengths, over)


# --------------------------------------------------------------------------- collating


def collate(
    batch: Sequence[Sequence[int]],
    pad_token_id: int = PAD_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    *,
    mask_prompt_lengths: Sequence[int] | None = None,
    pad_to: int | None = None,
    dtype: Any = np.int64,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's `custom_collate_fn` in NumPy: returns (inputs, targets), both [B, T].

    Each example gets one `pad_token_id` appended (its end-of-text), is padded with
    `pad_token_id` to the batch's longest + 1, inputs drop the last token, targets drop the
    first; in the targets every `pad_token_id` after the first becomes `ignore_index`. Then
    both are truncated to `allowed_max_length`.

    Options beyond the reference's: `mask_prompt_lengths[i]` also sets the targets that predict the
    prompt's own tokens to `ignore_index` (the reference's instruction masking); `pad_to`
    widens the arrays to that length with `pad_token_id` inputs and `ignore_index` targets,
    which leaves a loss that ignores `ignore_index` unchanged.
    """
    if len(batch) == 0:
        raise ValueError("collate: empty batch")
    if mask_prompt_lengths is not None and len(mask_prompt_lengths) != len(batch):
        raise ValueError(
            f"collate: {len(mask_prompt_lengths)} prompt lengths for a batch of {len(batch)}"
        )
    width = max(len(item) for item in batch) + 1  # longest + its appended end-of-text
    padded = np.full((len(batch), width), pad_token_id, dtype=np.int64)
    for row, item in enumerate(batch):
        padded[row, : len(item)] = item
    inputs, targets = padded[:, :-1].copy(), padded[:, 1:].copy()

    # Like the reference, this looks at every pad id in the targets, not only the trailing ones.
    is_pad = targets == pad_token_id
    first_pad = is_pad & (np.cumsum(is_pad, axis=1) == 1)
    targets[is_pad & ~first_pad] = ignore_index

    if mask_prompt_lengths is not None:
        # targets[j] predicts token j + 1, so the first n - 1 targets are prompt tokens.
        for row, n_prompt in enumerate(mask_prompt_lengths):
            targets[row, : max(int(n_prompt) - 1, 0)] = ignore_index

    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]

    if pad_to is not None:
        extra = pad_to - inputs.shape[1]
        if extra < 0:
            raise ValueError(f"collate: pad_to={pad_to} is shorter than the batch ({inputs.shape[1]})")
        inputs = np.pad(inputs, ((0, 0), (0, extra)), constant_values=pad_token_id)
        targets = np.pad(targets, ((0, 0), (0, extra)), constant_values=ignore_index)
    return inputs.astype(dtype, copy=False), targets.astype(dtype, copy=False)


def bucket_length(n: int, multiple: int = 32, max_len: int | None = DEFAULT_MAX_LENGTH) -> int:
    """`n` rounded up to a multiple of `multiple`, capped at `max_len`."""
    if n < 1:
        raise ValueError(f"bucket_length: length must be positive, got {n}")
    if multiple < 1:
        raise ValueError(f"bucket_length: multiple must be positive, got {multiple}")
    if max_len is not None and n > max_len:
        raise ValueError(f"bucket_length: length {n} exceeds max_len {max_len}")
    rounded = math.ceil(n / multiple) * multiple
    return rounded if max_len is None else min(rounded, max_len)


def collate_bucketed(
    batch: Sequence[Sequence[int]],
    pad_token_id: int = PAD_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = DEFAULT_MAX_LENGTH,
    *,
    multiple: int = 32,
    mask_prompt_lengths: Sequence[int] | None = None,
    dtype: Any = np.int64,
) -> tuple[np.ndarray, np.ndarray]:
    """`collate`, then padded to the next bucket length (multiples of `multiple`, capped at
    `allowed_max_length`)."""
    tight = max(len(item) for item in batch) if len(batch) else 0
    if allowed_max_length is not None:
        tight = min(tight, allowed_max_length)
    return collate(
        batch,
        pad_token_id,
        ignore_index,
        allowed_max_length,
        mask_prompt_lengths=mask_prompt_lengths,
        pad_to=bucket_length(max(tight, 1), multiple, allowed_max_length),
        dtype=dtype,
    )


def tight_shape(targets: np.ndarray, ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
    """(rows, width) the reference's tight collate would have produced for this (bucketed) batch.

    Rows whose targets are all `ignore_index` (batch filler) are not counted; the width is one
    past the last column holding a target. Without prompt masking this is exact, so
    `rows * width` is the reference's tokens-seen increment.
    """
    kept = targets != ignore_index
    rows = int(kept.any(axis=1).sum())
    cols = np.flatnonzero(kept.any(axis=0))
    return rows, int(cols[-1]) + 1 if cols.size else 0


# --------------------------------------------------------------------------- batching


def batch_indices(
    n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int, epoch: int = 0
) -> list[np.ndarray]:
    """Index batches over `n` examples, in the same order as `jaxft.data.batching.batches`
    (a function of (seed, epoch) only). Index-based because the examples are ragged lists."""
    count = num_batches(n, batch_size, drop_last)  # also rejects empty data / bad sizes
    order = permutation(n, seed, epoch) if shuffle else np.arange(n)
    return [order[b * batch_size : (b + 1) * batch_size] for b in range(count)]


def instruction_batches(
    data: TokenizedInstructions,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    epoch: int = 0,
    mask_prompt: bool = False,
    allowed_max_length: int | None = DEFAULT_MAX_LENGTH,
    bucket_multiple: int | None = 32,
    fill_last_batch: bool = False,
    pad_token_id: int = PAD_ID,
    ignore_index: int = IGNORE_INDEX,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield collated (inputs, targets) batches: the reference's loaders are
    train `shuffle=True, drop_last=True` and validation/test `shuffle=False, drop_last=False`.

    `bucket_multiple=None` gives the reference's tightly padded shapes. `fill_last_batch` pads a
    short final batch with rows of pad inputs and `ignore_index` targets, so every batch has
    `batch_size` rows (one shape fewer to compile; a masked mean loss is unchanged).
    """
    order = batch_indices(len(data), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, epoch=epoch)
    for idx in order:
        items = [data.token_ids[i] for i in idx]
        lengths = [data.prompt_lengths[i] for i in idx] if mask_prompt else None
        if bucket_multiple is None:
            inputs, targets = collate(
                items, pad_token_id, ignore_index, allowed_max_length, mask_prompt_lengths=lengths
            )
        else:
            inputs, targets = collate_bucketed(
                items,
                pad_token_id,
                ignore_index,
                allowed_max_length,
                multiple=bucket_multiple,
                mask_prompt_lengths=lengths,
            )
        missing = batch_size - inputs.shape[0]
        if fill_last_batch and missing > 0:
            inputs = np.pad(inputs, ((0, missing), (0, 0)), constant_values=pad_token_id)
            targets = np.pad(targets, ((0, missing), (0, 0)), constant_values=ignore_index)
        yield inputs, targets
