"""Text-classification data: the SMS Spam Collection (the reference's chapter 6) and any `Label,Text` CSV.

The default pipeline reproduces the reference's pandas code row for row: read the tab-separated
file with pandas' default quote handling (5,572 rows: line 5,082 opens a double quote that never
closes and swallows the next two lines), undersample every class to the minority count
(`random_state=seed`), map labels to ids, shuffle (`random_state=seed`) and cut 70 / 10 / 20 %.
`parse="exact"` reads every line as one message instead (5,574 rows). The file itself comes from
`jaxft.sources.sms_spam_file` (bundled, or downloaded); the readers (this TSV, a CSV) and the label rules are
in `jaxft.data.labeled`.

Encoding pads with `<|endoftext|>` (50256) to the longest training sequence; validation and test
are truncated or padded to that length; nothing is ever longer than the model's context.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jaxft.data.labeled import (  # the readers; re-exported here, where they have always been named
    SMS_SPAM_FILE,
    SMS_SPAM_FILE_REFERENCE,
    Parse,
    fold_label,
    infer_class_names,
    read_labeled_csv,
    read_sms_collection,
    resolve_sms_spam_path,
)
from jaxft.fileio import atomic_write_text
from jaxft.tokenizer import PAD_ID, encode_text

SPLIT_NAMES = ("train", "validation", "test")
CONTEXT_LENGTH = 1024


class TruncationWarning(UserWarning):
    """Texts were cut to fit the model's context length (the count is in the message)."""


class SmallClassWarning(UserWarning):
    """Balancing cuts every class to one far smaller than the others (a stray label?)."""


SMALL_CLASS_RATIO = 50  # the largest class over 50x the smallest: SmallClassWarning


# ----------------------------------------------------------------------------- balance and split


def balance(frame: pd.DataFrame, class_names: Sequence[str], seed: int = 123) -> pd.DataFrame:
    """Undersample every class to the minority count, concatenated in class order.

    A class larger than the minority is sampled with `random_state=seed`; a class already at the
    minority count is kept whole and in order. For ham/spam this is exactly the reference's
    `pd.concat([ham.sample(n_spam, random_state=123), spam])`.
    """
    groups = [frame[frame["Label"] == name] for name in class_names]
    present = [group for group in groups if len(group)]
    if not present:
        raise ValueError("no rows to balance")
    minority = min(len(group) for group in present)
    if minority * SMALL_CLASS_RATIO < max(len(group) for group in present):
        # A stray label (a header line read as data, a typo) makes a tiny class, and balancing
        # to it throws the data away: say so (the SMS collection's classes are 747 and 4,825).
        smallest = next(name for name, group in zip(class_names, groups) if len(group) == minority)
        warnings.warn(
            f"class {smallest!r} has only {minority} row(s): balancing keeps {minority} of every class "
            f"({minority * len(present)} of {len(frame)} rows)",
            SmallClassWarning,
            stacklevel=2,
        )
    parts = [group.sample(minority, random_state=seed) if len(group) > minority else group for group in present]
    return pd.concat(parts)


def random_split(
    frame: pd.DataFrame, train_frac: float = 0.7, validation_frac: float = 0.1, seed: int = 123
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Shuffle (`random_state=seed`), then cut train / validation / the rest, as the reference does.

    The shuffled frame's index is reset, so the pieces keep consecutive indices (as the reference's).
    """
    shuffled = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(shuffled) * train_frac)
    validation_end = train_end + int(len(shuffled) * validation_frac)
    return shuffled[:train_end], shuffled[train_end:validation_end], shuffled[validation_end:]


@dataclass(frozen=True)
class Splits:
    """Three DataFrames (`Label` = class id, `Text`) and the class names in id order."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    class_names: list[str]

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        return self.train, self.validation, self.test


def _fractions(fractions: Sequence[float]) -> tuple[float, float]:
    if len(fractions) not in (2, 3) or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be (train, validation[, test]) >= 0, not {tuple(fractions)}")
    if len(fractions) == 3 and abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions {tuple(fractions)} do not sum to 1")
    if fractions[0] + fractions[1] > 1.0 + 1e-9:
        raise ValueError(f"train + validation fractions {fractions[0]} + {fractions[1]} exceed 1")
    return float(fractions[0]), float(fractions[1])


def splits_with_classes(
    path: str | Path,
    seed: int = 123,
    *,
    parse: Parse = "reference",
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    balanced: bool = True,
    class_names: Sequence[str] | None = None,
    normalize_labels: bool = False,
) -> Splits:
    """The reference's pipeline on a `label<TAB>text` file (or a directory holding
    `SMSSpamCollection`), or on a `.csv` with a `Label,Text` header: read, balance, map labels to
    ids, shuffle, split. Any number of classes; `class_names` fixes the id order;
    `normalize_labels` folds labels that differ only by case or surrounding spaces."""
    path = Path(path)
    train_frac, validation_frac = _fractions(fractions)
    if path.suffix.lower() == ".csv" and path.is_file():
        ids_frame, names = read_labeled_csv(path, class_names, normalize_labels=normalize_labels)
        # Back to names, so balancing and mapping are one code path for both formats.
        frame = pd.DataFrame({"Label": [names[i] for i in ids_frame["Label"]], "Text": ids_frame["Text"]})
    else:
        frame = read_sms_collection(path, parse=parse, normalize_labels=normalize_labels)
        if class_names is not None:
            names = [fold_label(name) for name in class_names] if normalize_labels else list(class_names)
        else:
            names = infer_class_names(frame["Label"], source=path)
    if len(names) < 2:
        raise ValueError(f"{path}: one class only ({', '.join(map(repr, names))}): a classifier needs rows of at least 2 labels")
    mapping = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(frame["Label"]) - set(mapping))
    if unknown:
        raise ValueError(f"{path}: unknown label(s) {', '.join(map(repr, unknown))} (classes: {', '.join(names)})")
    if balanced:
        frame = balance(frame, names, seed=seed)
    frame = frame.assign(Label=frame["Label"].map(mapping))
    parts = random_split(frame, train_frac, validation_frac, seed=seed)
    for name, part in zip(SPLIT_NAMES, parts):
        if len(part) == 0:
            counts = frame["Label"].value_counts()
            raise ValueError(
                f"{path}: the {name} split is empty ({len(frame)} rows after balancing, fractions {tuple(fractions)}; "
                f"the smallest class, {names[int(counts.idxmin())]!r}, has {int(counts.min())} row(s))"
            )
    return Splits(*parts, class_names=names)


def splits(path: str | Path, seed: int = 123, **options: Any) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, validation, test) DataFrames with `Label` (class id) and `Text`, the reference's semantics.

    On the real collection with the defaults: 1045 / 149 / 300 rows, identical to the reference's.
    Options: see `splits_with_classes` (parse, fractions, balanced, class_names, normalize_labels).
    """
    return splits_with_classes(path, seed, **options).frames()


def write_splits(
    out_dir: str | Path, train: pd.DataFrame, validation: pd.DataFrame, test: pd.DataFrame
) -> dict[str, Path]:
    """Write train.csv / validation.csv / test.csv (columns Label,Text, no index) as the reference
    does, each atomically (a failed write leaves the earlier file, or none, and raises WriteError)."""
    out_dir = Path(out_dir)
    paths = {}
    for name, frame in zip(SPLIT_NAMES, (train, validation, test)):
        paths[name] = out_dir / f"{name}.csv"
        atomic_write_text(paths[name], frame[["Label", "Text"]].to_csv(index=False))
    return paths


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class EncodedSplit:
    """Padded token ids [N, L] int32, class ids [N] int32, true (unpadded) lengths [N] int32."""

    tokens: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    num_truncated: int = 0  # texts cut to L tokens

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as a dict, ready for `jaxft.data.batching.batches`."""
        return {"tokens": self.tokens, "labels": self.labels, "lengths": self.lengths}


def tokenize(texts: Iterable[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of every text (`encode_text`: a literal `<|endoftext|>` is plain text)."""
    return [encode_text(tokenizer, text) for text in texts]


def training_length(
    token_lists: Sequence[Sequence[int]], max_length: int | None = None, context_length: int = CONTEXT_LENGTH
) -> int:
    """The padded length: `max_length` if given, else the longest sequence, capped at the context.

    `max_length` above the context length is an error; a longest sequence above it is capped
    (those texts are then truncated, with a counted `TruncationWarning`, by `pad_truncate`).
    """
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, not {max_length}")
        if max_length > context_length:
            raise ValueError(f"max_length {max_length} exceeds the model's context length {context_length}")
        return int(max_length)
    if not token_lists:
        raise ValueError("cannot take the longest sequence of an empty split")
    return min(max(len(tokens) for tokens in token_lists), context_length)


def pad_truncate(
    token_lists: Sequence[Sequence[int]],
    length: int,
    *,
    pad_token_id: int = PAD_ID,
    context_length: int = CONTEXT_LENGTH,
    name: str = "texts",
) -> tuple[np.ndarray, np.ndarray, int]:
    """Cut or pad every sequence to `length`: (tokens [N, length] int32, lengths [N] int32, number cut).

    Sequences longer than `length` are cut (the reference does this silently for validation/test);
    those longer than the context length also raise a `TruncationWarning` with their count.
    """
    tokens = np.full((len(token_lists), length), pad_token_id, dtype=np.int32)
    lengths = np.empty(len(token_lists), dtype=np.int32)
    over_context = []
    truncated = 0
    for row, ids in enumerate(token_lists):
        if len(ids) == 0:
            raise ValueError(f"{name}: row {row}: empty text (no tokens)")
        if len(ids) > context_length:
            over_context.append(row)
        truncated += len(ids) > length
        kept = ids[:length]
        tokens[row, : len(kept)] = kept
        lengths[row] = len(kept)
    if over_context:
        shown = ", ".join(map(str, over_context[:5])) + (", ..." if len(over_context) > 5 else "")
        warnings.warn(
            f"{name}: {len(over_context)} of {len(token_lists)} texts are longer than the context length "
            f"{context_length} tokens and were truncated to {length} (rows {shown})",
            TruncationWarning,
            stacklevel=2,
        )
    return tokens, lengths, truncated


def encode_texts(
    texts: Iterable[str],
    tokenizer: Any,
    max_length: int | None = None,
    pad_token_id: int = PAD_ID,
    context_length: int = CONTEXT_LENGTH,
) -> np.ndarray:
    """Token ids [N, L] int32, padded with `pad_token_id` to `max_length` or the longest text."""
    token_lists = tokenize(texts, tokenizer)
    length = training_length(token_lists, max_length, context_length)
    tokens, _, _ = pad_truncate(token_lists, length, pad_token_id=pad_token_id, context_length=context_length)
    return tokens


def encode_split(
    frame: pd.DataFrame,
    tokenizer: Any,
    max_length: int | None = None,
    *,
    pad_token_id: int = PAD_ID,
    context_length: int = CONTEXT_LENGTH,
    name: str = "split",
) -> EncodedSplit:
    """One split (`Label` ids, `Text`) encoded; `max_length=None` pads to its longest text."""
    if len(frame) == 0:
        raise ValueError(f"{name}: empty split")
    token_lists = tokenize(frame["Text"], tokenizer)
    length = training_length(token_lists, max_length, context_length)
    tokens, lengths, truncated = pad_truncate(
        token_lists, length, pad_token_id=pad_token_id, context_length=context_length, name=name
    )
    labels = np.asarray(frame["Label"], dtype=np.int32)
    return EncodedSplit(tokens, labels, lengths, truncated)


def encode_splits(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    test: pd.DataFrame,
    tokenizer: Any,
    max_length: int | None = None,
    *,
    pad_token_id: int = PAD_ID,
    context_length: int = CONTEXT_LENGTH,
) -> tuple[EncodedSplit, EncodedSplit, EncodedSplit]:
    """The reference's SpamDataset trio: train padded to its longest text (or `max_length`), validation
    and test cut/padded to the same length (120 on the real data with GPT-2's vocabulary)."""
    options = dict(pad_token_id=pad_token_id, context_length=context_length)
    encoded_train = encode_split(train, tokenizer, max_length, name="train", **options)
    length = encoded_train.length
    return (
        encoded_train,
        encode_split(validation, tokenizer, length, name="validation", **options),
        encode_split(test, tokenizer, length, name="test", **options),
    )
