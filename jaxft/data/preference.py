"""Preference data (instruction, input, chosen, rejected): load, validate, split, tokenise, and the
reference's DPO collate (its `dpo-from-scratch` notebook's `custom_collate_fn`) in NumPy.

Split and prompts are the instruction recipe's (jaxft.data.instruct): in file order 85% train,
10% test, the rest validation; each full text is prompt + "\\n\\n### Response:\\n" + response.
Batches are padded to bucket widths (a few compiled shapes); the extra positions are pad
tokens with a False mask, so log-probabilities over the mask are unchanged (causal attention:
later positions never change earlier ones).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxft.assets import asset_path, check_sha256
from jaxft.data import instruct
from jaxft.data.instruct import DEFAULT_MAX_LENGTH, InstructionDataError, Splits, bucket_length, split_entries  # noqa: F401
from jaxft.tokenizer import PAD_ID, encode_text

Entry = dict[str, Any]

PREFERENCE_DATA_FILE = "instruction-data-with-preference.json"
PREFERENCE_DATA_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
RESPONSES = ("chosen", "rejected")


def bundled_file() -> Path:
    """The reference's instruction-data-with-preference.json shipped in the package (hash-checked)."""
    path = asset_path(PREFERENCE_DATA_FILE)
    check_sha256(path.read_bytes(), PREFERENCE_DATA_SHA256, path)
    return path


def validate_entries(data: Any, source: str | Path = "<data>") -> list[Entry]:
    """Instruction entries (jaxft.data.instruct.validate_entries, `output` optional) whose
    `chosen` and `rejected` are strings."""
    entries = instruct.validate_entries(data, source, require_output=False)
    for index, entry in enumerate(entries):
        for name in RESPONSES:
            if name not in entry:
                raise InstructionDataError(f"{source}: entry {index}: missing required field '{name}'")
            if not isinstance(entry[name], str):
                raise InstructionDataError(f"{source}: entry {index}: field '{name}' must be a string, got {instruct._type_name(entry[name])}")
    return entries


def load_entries(path: str | Path) -> list[Entry]:
    """Read and validate a JSON list of {instruction, input, chosen, rejected} entries."""
    return validate_entries(instruct.load_entries(path, require_output=False), path)


@dataclass(frozen=True)
class TokenizedPreferences:
    """Per entry: the prompt's token count and the full texts' ids with each response."""

    prompt_lengths: list[int]
    chosen: list[list[int]]
    rejected: list[list[int]]
    n_over_length: int = 0  # entries with a full text longer than the context (cut by the collate)

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def part(self, lo: int, hi: int) -> TokenizedPreferences:
        return TokenizedPreferences(self.prompt_lengths[lo:hi], self.chosen[lo:hi], self.rejected[lo:hi])


def tokenize_entries(entries: Sequence[Mapping[str, Any]], tokenizer: Any, style: str = "alpaca", *,
                     max_length: int = DEFAULT_MAX_LENGTH, source: str | Path = "<data>") -> TokenizedPreferences:
    """The reference's PreferenceDataset: prompt = encode(prompt text), chosen/rejected =
    encode(prompt + response prefix + response). An entry none of whose response tokens fall
    within `max_length` would score nothing (a NaN mean): refused, naming it."""
    style_ = instruct.get_style(style)
    prompts, chosen, rejected, over = [], [], [], 0
    for index, entry in enumerate(entries):
        n_prompt = len(encode_text(tokenizer, style_.prompt(entry)))
        pair = [encode_text(tokenizer, style_.texts({**entry, "output": entry[name]})[1]) for name in RESPONSES]
        for name, ids in zip(RESPONSES, pair):
            # scored: positions n_prompt + 2 .. len - 1 of the text cut at max_length (position 0 never is)
            if min(len(ids), max_length) <= max(n_prompt + 2, 1):
                raise InstructionDataError(f"{source}: entry {index}: the {name} text ({len(ids)} tokens, prompt {n_prompt}) "
                                           f"leaves no response token to score within {max_length} tokens")
        over += max(map(len, pair)) > max_length
        prompts.append(n_prompt)
        chosen.append(pair[0])
        rejected.append(pair[1])
    return TokenizedPreferences(prompts, chosen, rejected, over)


def collate(prompt_lengths: Sequence[int], chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], *,
            pad_token_id: int = PAD_ID, allowed_max_length: int | None = None, mask_prompt_tokens: bool = True,
            pad_to: int | None = None) -> dict[str, np.ndarray]:
    """The reference's DPO collate: chosen and rejected right-padded with `pad_token_id` to one
    width, the longest of either + 1; masks False on the padding and (mask_prompt_tokens) on the
    first prompt length + 2 positions; every array cut at `allowed_max_length`. `pad_to`
    widens to that many columns (pad tokens, False mask). Returns chosen, rejected [B, T]
    int32 and chosen_mask, rejected_mask [B, T] bool."""
    if not len(prompt_lengths):
        raise ValueError("collate: empty batch")
    width = max(len(seq) + 1 for seq in (*chosen, *rejected))
    out: dict[str, np.ndarray] = {}
    for name, seqs in zip(RESPONSES, (chosen, rejected)):
        tokens = np.full((len(seqs), width), pad_token_id, np.int32)
        mask = np.zeros((len(seqs), width), bool)
        for row, (seq, n_prompt) in enumerate(zip(seqs, prompt_lengths)):
            tokens[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
            if mask_prompt_tokens:
                mask[row, : n_prompt + 2] = False
        out[name], out[f"{name}_mask"] = tokens, mask
    if allowed_max_length is not None:
        out = {key: value[:, :allowed_max_length] for key, value in out.items()}
    if pad_to is not None:
        extra = pad_to - out["chosen"].shape[1]
        if extra < 0:
            raise ValueError(f"collate: pad_to={pad_to} is shorter than the batch ({out['chosen'].shape[1]})")
        out = {key: np.pad(value, ((0, 0), (0, extra)), constant_values=pad_token_id if value.dtype != bool else False)
               for key, value in out.items()}
    return out


def tight_width(data: TokenizedPreferences, index: Sequence[int], allowed_max_length: int | None) -> int:
    """The width of the reference's collated batch of these examples (for tokens seen)."""
    width = max(len(seq) + 1 for i in index for seq in (data.chosen[i], data.rejected[i]))
    return width if allowed_max_length is None else min(width, allowed_max_length)


def preference_batches(data: TokenizedPreferences, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int, epoch: int = 0,
                       allowed_max_length: int | None = DEFAULT_MAX_LENGTH, bucket_multiple: int | None = 32,
                       fill_last_batch: bool = False, pad_token_id: int = PAD_ID) -> Iterator[dict[str, np.ndarray]]:
    """Collated batches in the reference loaders' order (training: shuffled by (seed, epoch),
    drop_last; evaluation: in order), plus `index` [B] (each row's example, for looked-up
    reference log-probabilities) and `weights` [B] (0 on the rows that fill a short last batch
    with `fill_last_batch`). `bucket_multiple=None`: the reference's tight widths."""
    order = instruct.batch_indices(len(data), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, epoch=epoch)
    for idx in order:
        pad_to = None
        if bucket_multiple is not None:
            pad_to = bucket_length(tight_width(data, idx, allowed_max_length), bucket_multiple, allowed_max_length)
        batch = collate([data.prompt_lengths[i] for i in idx], [data.chosen[i] for i in idx], [data.rejected[i] for i in idx],
                        pad_token_id=pad_token_id, allowed_max_length=allowed_max_length, pad_to=pad_to)
        batch["index"] = np.asarray(idx, np.int32)
        batch["weights"] = np.ones(len(idx), np.float32)
        missing = batch_size - len(idx)
        if fill_last_batch and missing > 0:  # filler rows: one scored token each (no 0/0), weight 0
            for key in RESPONSES:
                batch[key] = np.pad(batch[key], ((0, missing), (0, 0)), constant_values=pad_token_id)
                filler = np.zeros((missing, batch[key].shape[1]), bool)
                filler[:, 1] = True
                batch[f"{key}_mask"] = np.concatenate([batch[f"{key}_mask"], filler])
            batch["index"] = np.pad(batch["index"], (0, missing))
            batch["weights"] = np.pad(batch["weights"], (0, missing))
        yield batch
