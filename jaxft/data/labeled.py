"""Labeled text for classification: the `Label,Text` CSV reader and the rules for labels.

Labels are class names (ids in sorted-name order, the reference's ham=0, spam=1) or integer
class ids. Every problem is reported as one line naming the file and, where there is one, the
line.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def read_text(path: Path) -> str:
    """The file decoded as UTF-8; undecodable bytes give the line number."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: line {line}: undecodable bytes {data[exc.start:exc.end]!r} (expected UTF-8)"
        ) from None


# ----------------------------------------------------------------------------- label rules


def _as_int(label: Any) -> int | None:
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return int(label)
    if isinstance(label, str):
        stripped = label.strip()
        if stripped.lstrip("-").isdigit():
            return int(stripped)
    return None


def infer_class_names(labels: Iterable[Any]) -> list[str]:
    """Class names in id order: integer labels keep their value as id ("0".."max"), otherwise
    the distinct names sorted (the reference's ham=0, spam=1)."""
    labels = list(labels)
    as_ints = [_as_int(label) for label in labels]
    if labels and all(value is not None for value in as_ints):
        return [str(i) for i in range(max(as_ints) + 1)]
    return sorted({str(label) for label in labels})


def label_ids(
    labels: Sequence[Any], class_names: Sequence[str], *, where: Sequence[str] | None = None
) -> np.ndarray:
    """Map labels to ids by name; integer labels not among the names are kept as ids.

    `where[i]` names row i in error messages (e.g. "data.csv: line 7").
    """
    index = {name: i for i, name in enumerate(class_names)}
    ids = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        key = str(label)
        if key in index:
            ids[i] = index[key]
            continue
        value = _as_int(label)
        if value is not None and 0 <= value < len(class_names):
            ids[i] = value
            continue
        place = where[i] if where is not None else f"row {i}"
        raise ValueError(f"{place}: unknown label {key!r} (classes: {', '.join(class_names)})")
    return ids


# ----------------------------------------------------------------------------- the CSV reader


def read_labeled_csv(
    path: str | Path, class_names: Sequence[str] | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """A user CSV with columns `Label,Text` (header required, other columns ignored).

    Returns (frame with int `Label` ids and str `Text`, class names). Without `class_names` they
    are inferred (`infer_class_names`); pass the training split's names when reading validation
    and test, so an unseen label is an error. Integer labels are kept as ids.
    Errors are one line naming the file and line: missing column, wrong field count, unknown
    label, empty text, undecodable bytes, no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    text = read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    labels: list[str] = []
    texts: list[str] = []
    where: list[str] = []
    previous_end = 0
    try:
        for record in reader:
            start, previous_end = previous_end + 1, reader.line_num  # a quoted field may span lines
            if not record or not "".join(record).strip():
                continue
            if header is None:
                header = [name.strip().lower() for name in record]
                missing = [name for name in ("Label", "Text") if name.lower() not in header]
                if missing:
                    raise ValueError(
                        f"{path}: line {start}: missing column {' and '.join(missing)} "
                        f"(header is {','.join(record)!r}; expected Label,Text)"
                    )
                label_col, text_col = header.index("label"), header.index("text")
                continue
            if len(record) != len(header):
                raise ValueError(f"{path}: line {start}: expected {len(header)} fields, found {len(record)}")
            label, message = record[label_col], record[text_col]
            if not label.strip():
                raise ValueError(f"{path}: line {start}: empty label")
            if not message.strip():
                raise ValueError(f"{path}: line {start}: empty text")
            labels.append(label)
            texts.append(message)
            where.append(f"{path}: line {start}")
    except csv.Error as exc:
        raise ValueError(f"{path}: line {reader.line_num}: {exc}") from None
    if header is None:
        raise ValueError(f"{path}: file is empty (expected a header line 'Label,Text')")
    if not labels:
        raise ValueError(f"{path}: no rows after the header")
    names = list(class_names) if class_names is not None else infer_class_names(labels)
    ids = label_ids(labels, names, where=where)
    frame = pd.DataFrame({"Label": ids, "Text": pd.Series(texts, dtype="str")})
    return frame, names
