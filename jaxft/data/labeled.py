"""Labeled text for classification: the readers (a `Label,Text` CSV; the SMS collection's
`label<TAB>text` lines) and the rules for labels.

Labels are class names (ids in sorted-name order, the reference's ham=0, spam=1) or integer
class ids 0..K-1. Every problem is reported as one line naming the file and, where there is
one, the line.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

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


def fold_label(label: str) -> str:
    """The spelling `normalize_labels=True` maps a label to: stripped, lower-case."""
    return label.strip().lower()


def check_label_spellings(labels: Iterable[str], source: str | Path, normalize: bool = False) -> list[str]:
    """`labels` unchanged, or folded (`fold_label`) when `normalize`.

    Without `normalize`, labels that differ only by case or surrounding spaces (" Ham ", "ham")
    are refused: they would silently become separate classes.
    """
    labels = [str(label) for label in labels]
    if normalize:
        return [fold_label(label) for label in labels]
    spellings: dict[str, set[str]] = {}
    for label in labels:
        spellings.setdefault(fold_label(label), set()).add(label)
    clashes = sorted(spelling for group in spellings.values() if len(group) > 1 for spelling in group)
    if clashes:
        raise ValueError(
            f"{source}: labels {', '.join(map(repr, clashes))} differ only by case or surrounding spaces "
            "(fix them, or pass --normalize-labels (normalize_labels=True) to strip and lower-case every label)"
        )
    return labels


def infer_class_names(labels: Iterable[Any], *, source: str | Path = "labels") -> list[str]:
    """Class names in id order: integer labels are the ids themselves ("0".."K-1", every one
    present), otherwise the distinct names sorted (the reference's ham=0, spam=1)."""
    labels = list(labels)
    as_ints = [_as_int(label) for label in labels]
    if labels and all(value is not None for value in as_ints):
        found = sorted(set(as_ints))
        if found != list(range(len(found))):
            missing = sorted(set(range(max(found) + 1)) - set(found))
            detail = f"missing {', '.join(map(str, missing))}" if found[0] >= 0 else "negative ids"
            raise ValueError(
                f"{source}: integer labels must be the class ids 0..K-1 with every id present; "
                f"found {', '.join(map(str, found))} ({detail})"
            )
        return [str(i) for i in found]
    return sorted({str(label) for label in labels})


def label_ids(
    labels: Sequence[Any], class_names: Sequence[str], *, where: Sequence[str] | None = None
) -> np.ndarray:
    """Map labels to ids by name. A file whose labels are all integers (as `write_splits`
    writes) may also give the ids themselves, 0..len(class_names)-1.

    `where[i]` names row i in error messages (e.g. "data.csv: line 7").
    """
    index = {name: i for i, name in enumerate(class_names)}
    # Ids are accepted only from a file of ids, so a stray "1" among names is an unknown label.
    ids_file = all(_as_int(label) is not None for label in labels)
    ids = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        key = str(label)
        if key in index:
            ids[i] = index[key]
            continue
        value = _as_int(label)
        if ids_file and value is not None and 0 <= value < len(class_names):
            ids[i] = value
            continue
        place = where[i] if where is not None else f"row {i}"
        raise ValueError(
            f"{place}: unknown label {key!r} (classes: {', '.join(class_names)}); "
            "every label must occur in the training data"
        )
    return ids


# ----------------------------------------------------------------------------- the CSV reader


def _unclosed_quote_line(lines: Sequence[str], first: int) -> int | None:
    """The line where a quoted field opens and never closes, scanning one CSV record that
    starts at line `first` (csv's default dialect); None when every quote closes.

    Python's csv reader (non-strict) silently reads such a field to the end of the file.
    """
    in_quotes = quote_seen = False
    field_start, opened = True, None
    for number, line in enumerate(lines, start=first):
        for char in line:
            if in_quotes:
                if quote_seen:
                    quote_seen = False
                    if char == '"':
                        continue  # a doubled quote: a literal quote, still inside
                    in_quotes = False  # the quote closed the field; `char` is outside
                elif char == '"':
                    quote_seen = True
                    continue
                else:
                    continue
            if char == '"' and field_start:
                in_quotes, opened, field_start = True, number, False
            else:
                field_start = char in ",\r\n"
    return opened if in_quotes and not quote_seen else None


def read_labeled_csv(
    path: str | Path, class_names: Sequence[str] | None = None, *, normalize_labels: bool = False
) -> tuple[pd.DataFrame, list[str]]:
    """A user CSV with columns `Label,Text` (header required, other columns ignored).

    Returns (frame with int `Label` ids and str `Text`, class names). Without `class_names` they
    are inferred (`infer_class_names`); pass the training split's names when reading validation
    and test, so a label absent from training is an error. `normalize_labels` strips and
    lower-cases every label (otherwise labels differing only so are refused).
    Errors are one line naming the file and line: missing column, wrong field count, unclosed
    quote, unknown label, empty text, undecodable bytes, no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    text = read_text(path)
    lines = io.StringIO(text, newline="").readlines()  # the lines csv counts in line_num
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    labels: list[str] = []
    texts: list[str] = []
    where: list[str] = []
    previous_end = 0
    # csv refuses fields over 131,072 characters by default; a long text is cut to the context
    # later, as in every other format. The limit is process-wide: restored below.
    field_limit = csv.field_size_limit(sys.maxsize)
    try:
        for record in reader:
            start, previous_end = previous_end + 1, reader.line_num  # a quoted field may span lines
            if previous_end == len(lines):
                # Only the last record can hold an unclosed quote (it runs to the end of the file);
                # checked first, as it also garbles the field count and the labels.
                opened = _unclosed_quote_line(lines[start - 1 :], start)
                if opened is not None:
                    raise ValueError(
                        f"{path}: line {opened}: a quoted field opens here and is never closed "
                        "(it would swallow the rest of the file)"
                    )
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
    finally:
        csv.field_size_limit(field_limit)
    if header is None:
        raise ValueError(f"{path}: file is empty (expected a header line 'Label,Text')")
    if not labels:
        raise ValueError(f"{path}: no rows after the header")
    labels = check_label_spellings(labels, path, normalize_labels)
    if class_names is not None:
        names = [fold_label(name) for name in class_names] if normalize_labels else list(class_names)
    else:
        names = infer_class_names(labels, source=path)
    ids = label_ids(labels, names, where=where)
    frame = pd.DataFrame({"Label": ids, "Text": pd.Series(texts, dtype="str")})
    return frame, names


# ----------------------------------------------------------------------------- the SMS collection's format

SMS_SPAM_FILE = "SMSSpamCollection"
# The reference renames the extracted file to this; accept it where it already exists.
SMS_SPAM_FILE_REFERENCE = "SMSSpamCollection.tsv"

Parse = Literal["reference", "seed", "exact"]  # "seed": the old name of "reference"


def resolve_sms_spam_path(path: str | Path) -> Path:
    """`path` itself, or the collection file inside a directory holding it."""
    path = Path(path)
    if path.is_dir():
        for name in (SMS_SPAM_FILE, SMS_SPAM_FILE_REFERENCE):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: directory has no {SMS_SPAM_FILE} (or {SMS_SPAM_FILE_REFERENCE})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return path


# ----------------------------------------------------------------------------- reading


def _tsv_lines(path: Path, text: str) -> list[tuple[int, str, str]]:
    """(line number, label, text) for every non-blank line of a `label<TAB>text` file."""
    rows = []
    for number, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):  # pandas' line ends
        if not line.strip():
            continue  # blank lines hold no message (pandas skips them too)
        label, tab, message = line.partition("\t")
        if not tab:
            raise ValueError(f"{path}: line {number}: no tab between label and text")
        if not label.strip():
            raise ValueError(f"{path}: line {number}: empty label")
        if not message.strip():
            raise ValueError(f"{path}: line {number}: empty text")
        rows.append((number, label, message))
    if not rows:
        raise ValueError(f"{path}: file is empty (expected lines 'label<TAB>text')")
    return rows


def read_sms_collection(path: str | Path, parse: Parse = "reference", *, normalize_labels: bool = False) -> pd.DataFrame:
    """The tab-separated collection as a DataFrame with string columns `Label`, `Text`.

    `parse="reference"` (or its old name "seed"): pandas' default quote handling, as the
    reference's `pd.read_csv(path, sep="\\t", header=None)` (5,572 rows on the real file), except
    that texts such as "NA" stay text. `parse="exact"`: one row per line, quotes kept verbatim
    (5,574 rows). A malformed line is reported with its line number (with pandas' quotes, where a
    quoted text may span lines, the row's). Labels differing only by case or surrounding spaces are
    refused unless `normalize_labels` (strip, lower-case).
    """
    path = resolve_sms_spam_path(path)
    text = read_text(path)
    if parse == "exact":
        rows = _tsv_lines(path, text)
        frame = pd.DataFrame(
            {"Label": [label for _, label, _ in rows], "Text": [message for _, _, message in rows]}
        ).astype({"Label": "str", "Text": "str"})
        return _checked_labels(frame, path, normalize_labels)
    if parse not in ("reference", "seed"):
        raise ValueError(f"parse must be 'reference' (or 'seed') or 'exact', not {parse!r}")
    try:
        # na_filter=False: a message reading "NA" or "null" is text, not a missing value.
        frame = pd.read_csv(
            io.StringIO(text), sep="\t", header=None, names=["Label", "Text"], dtype=str, na_filter=False
        )
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except pd.errors.ParserError as exc:
        raise ValueError(f"{path}: {exc}".replace("\n", " ")) from None
    if frame.empty:
        raise ValueError(f"{path}: file is empty (expected lines 'label<TAB>text')")
    for column in ("Label", "Text"):
        empty = np.flatnonzero(frame[column].fillna("").str.strip().eq("").to_numpy())
        if len(empty):
            if '"' not in text:
                _tsv_lines(path, text)  # no quotes: rows are lines, so name the line and what is wrong
            raise ValueError(
                f"{path}: row {empty[0] + 1}: empty {column.lower()} after pandas' quote handling "
                "(parse='exact' reads the line verbatim)"
            )
    return _checked_labels(frame, path, normalize_labels)


def _checked_labels(frame: pd.DataFrame, path: Path, normalize: bool) -> pd.DataFrame:
    if normalize:
        return frame.assign(Label=frame["Label"].map(fold_label))
    check_label_spellings(frame["Label"], path)  # " Ham " next to "ham": refused
    return frame
