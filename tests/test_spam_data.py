"""SMS spam / labeled-CSV data: parity with the reference's pandas code, encoding, bad input."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jaxft.data import labeled, spam
from jaxft.data.batching import num_batches
from jaxft.tokenizer import EOT_ID, encode_text


@pytest.fixture(scope="module")
def sms_file(shared_data: Path) -> Path:
    return shared_data / "sms_spam_collection" / "SMSSpamCollection"


@pytest.fixture(scope="module")
def real_splits(sms_file: Path) -> spam.Splits:
    return spam.splits_with_classes(sms_file)


def reference_pandas_splits(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The reference's steps, restated here with plain pandas calls (what to match)."""
    df = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"])
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    balanced = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    shuffled = balanced.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(shuffled) * 0.7)
    validation_end = train_end + int(len(shuffled) * 0.1)
    return shuffled[:train_end], shuffled[train_end:validation_end], shuffled[validation_end:]


# ----------------------------------------------------------------------------- real data


def test_parse_reference_and_exact_row_counts(sms_file: Path):
    reference = spam.read_sms_collection(sms_file)
    exact = spam.read_sms_collection(sms_file, parse="exact")
    assert len(reference) == 5572
    assert reference["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}
    assert len(exact) == 5574
    assert exact["Label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    # The reference parse swallows lines 5,083-5,084 into row 5,081 (0-based) via the unclosed quote.
    assert "\nham\tYeah, give me a call" in reference["Text"][5081]
    assert exact["Text"][5081].startswith('"Keep ur problems')
    pd.testing.assert_frame_equal(reference, pd.read_csv(sms_file, sep="\t", header=None, names=["Label", "Text"]))


def test_splits_match_reference_pandas_row_for_row(sms_file: Path, real_splits: spam.Splits):
    ours = spam.splits(sms_file, seed=123)
    assert [len(frame) for frame in ours] == [1045, 149, 300]
    for mine, theirs in zip(ours, reference_pandas_splits(sms_file)):
        pd.testing.assert_frame_equal(mine, theirs)  # values, dtypes and index
    assert real_splits.class_names == ["ham", "spam"]
    assert spam.splits(sms_file.parent)[2]["Text"].tolist() == ours[2]["Text"].tolist()  # directory form


def test_exact_parse_and_another_seed_change_the_split(sms_file: Path, real_splits: spam.Splits):
    exact = spam.splits(sms_file, parse="exact")
    assert [len(frame) for frame in exact] == [1045, 149, 300]  # same spam count, same sizes
    assert not exact[0]["Text"].equals(real_splits.train["Text"])
    other = spam.splits(sms_file, seed=7)
    assert not other[0]["Text"].equals(real_splits.train["Text"])


def test_encoding_and_batch_counts_match_the_reference(tmp_path: Path, real_splits: spam.Splits, tokenizer):
    train, validation, test = spam.encode_splits(*real_splits.frames(), tokenizer)
    assert train.length == validation.length == test.length == 120
    assert train.tokens.dtype == np.int32 and train.tokens.shape == (1045, 120)
    counts = [num_batches(len(train), 8, True)] + [num_batches(len(s), 8, False) for s in (validation, test)]
    assert counts == [130, 19, 38]
    # The reference writes CSVs and its SpamDataset re-reads them with pandas: same tokens.
    paths = spam.write_splits(tmp_path, *real_splits.frames())
    for encoded, name in zip((train, validation, test), spam.SPLIT_NAMES):
        frame = pd.read_csv(paths[name])
        ids = [tokenizer.encode(text)[:120] for text in frame["Text"]]
        expected = np.array([row + [50256] * (120 - len(row)) for row in ids])
        np.testing.assert_array_equal(encoded.tokens, expected)
        np.testing.assert_array_equal(encoded.labels, frame["Label"].to_numpy())
        np.testing.assert_array_equal(encoded.lengths, [len(row) for row in ids])
    # The last real token sits at lengths-1; everything after it is padding.
    row = int(np.argmin(train.lengths))
    assert train.tokens[row, train.lengths[row] - 1] != 50256
    assert (train.tokens[row, train.lengths[row]:] == 50256).all()


def test_write_splits_round_trips_through_read_labeled_csv(tmp_path: Path, real_splits: spam.Splits):
    paths = spam.write_splits(tmp_path, *real_splits.frames())
    assert sorted(p.name for p in paths.values()) == ["test.csv", "train.csv", "validation.csv"]
    frame, names = labeled.read_labeled_csv(paths["validation"], real_splits.class_names)
    assert names == ["ham", "spam"]
    assert frame["Label"].tolist() == real_splits.validation["Label"].tolist()
    assert frame["Text"].tolist() == real_splits.validation["Text"].tolist()


# ----------------------------------------------------------------------------- encoding rules


def test_max_length_and_context_cap(tokenizer):
    frame = pd.DataFrame({"Label": [0, 1], "Text": ["one two three four five six", "hi"]})
    short = spam.encode_split(frame, tokenizer, max_length=3)
    assert short.tokens.shape == (2, 3) and short.num_truncated == 1
    assert short.lengths.tolist() == [3, 1]
    padded = spam.encode_split(frame, tokenizer, max_length=10, context_length=16)
    assert padded.tokens.shape == (2, 10) and (padded.tokens[1, 1:] == 50256).all()
    with pytest.raises(ValueError, match="exceeds the model's context length 16"):
        spam.encode_split(frame, tokenizer, max_length=17, context_length=16)
    with pytest.warns(spam.TruncationWarning, match=r"train: 1 of 2 texts are longer than the context length 4"):
        capped = spam.encode_split(frame, tokenizer, context_length=4, name="train")
    assert capped.length == 4 and capped.num_truncated == 1
    assert spam.encode_texts(["a b c", "a"], tokenizer, pad_token_id=7).tolist()[1][1:] == [7, 7]
    with pytest.raises(ValueError, match="validation: empty split"):
        spam.encode_split(frame[:0], tokenizer, name="validation")


def test_no_warning_for_reference_length_truncation(tokenizer):
    train = pd.DataFrame({"Label": [0], "Text": ["short"]})
    test = pd.DataFrame({"Label": [1], "Text": ["a much longer text than the training one"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, encoded = spam.encode_splits(train, train, test, tokenizer)
    assert encoded.length == 1 and encoded.num_truncated == 1  # counted, as the reference cuts silently


# ----------------------------------------------------------------------------- any classes


def test_multiclass_csv_splits_balance_every_class(tmp_path: Path):
    rows = [("sport", f"match report {i}") for i in range(30)]
    rows += [("politics", f"election news {i}") for i in range(20)]
    rows += [("weather", f"rain forecast {i}") for i in range(12)]
    path = tmp_path / "news.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("Label", "Text"), *rows])
    result = spam.splits_with_classes(path, seed=3)
    assert result.class_names == ["politics", "sport", "weather"]
    whole = pd.concat(result.frames())
    assert len(whole) == 36 and whole["Label"].value_counts().to_dict() == {0: 12, 1: 12, 2: 12}
    assert [len(frame) for frame in result.frames()] == [25, 3, 8]
    # Every text keeps its own class.
    prefix = {0: "election", 1: "match", 2: "rain"}
    assert all(text.startswith(prefix[label]) for label, text in zip(whole["Label"], whole["Text"]))
    unbalanced = spam.splits(path, balanced=False, fractions=(0.5, 0.25, 0.25))
    assert [len(frame) for frame in unbalanced] == [31, 15, 16]


def test_balance_generalises_the_reference_for_n_classes():
    frame = pd.DataFrame({"Label": list("aaaaabbcccc"), "Text": [str(i) for i in range(11)]})
    balanced = spam.balance(frame, ["a", "b", "c"], seed=123)
    expected = pd.concat([
        frame[frame["Label"] == "a"].sample(2, random_state=123),
        frame[frame["Label"] == "b"],  # already at the minority count: kept whole, in order
        frame[frame["Label"] == "c"].sample(2, random_state=123),
    ])
    pd.testing.assert_frame_equal(balanced, expected)


def test_read_labeled_csv_integer_and_string_labels(tmp_path: Path):
    ints = tmp_path / "ints.csv"
    ints.write_text("Label,Text\n2,two\n0,zero\n1,one\n")  # ids 0..K-1, every one present
    frame, names = labeled.read_labeled_csv(ints)
    assert frame["Label"].tolist() == [2, 0, 1] and names == ["0", "1", "2"]
    words = tmp_path / "words.csv"
    words.write_text('text,label,extra\n"hello, ""world""\nagain",pos,x\nbad,neg,y\n')
    frame, names = labeled.read_labeled_csv(words)
    assert names == ["neg", "pos"] and frame["Label"].tolist() == [1, 0]
    assert frame["Text"][0] == 'hello, "world"\nagain'


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "content, message",
    [
        ("Label,Body\nham,hi\n", r"line 1: missing column Text"),
        ("Label,Text\nham,hi\nspam,win\nfoo,what\n", r"line 4: unknown label 'foo' \(classes: ham, spam\)"),
        ("Label,Text\nham,hi\nspam,   \n", r"line 3: empty text"),
        ("Label,Text\nham,hi\nspam\n", r"line 3: expected 2 fields, found 1"),
        ("Label,Text\n\"ham\",\"multi\nline\"\nspam,\n", r"line 4: empty text"),
        ("", r"file is empty"),
        ("Label,Text\n", r"no rows after the header"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        labeled.read_labeled_csv(path, ["ham", "spam"])
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_undecodable_bytes_name_the_line(tmp_path: Path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"Label,Text\nham,ok\nspam,caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1.csv: line 3: undecodable bytes"):
        labeled.read_labeled_csv(path)
    tsv = tmp_path / "collection"
    tsv.write_bytes(b"ham\tok\nspam\t\xff\xfe\n")
    with pytest.raises(ValueError, match=r"collection: line 2: undecodable bytes"):
        spam.read_sms_collection(tsv)


@pytest.mark.parametrize(
    "content, message",
    [
        ("ham\thi\nspam no tab\n", r"line 2: no tab between label and text"),
        ("ham\thi\nspam\t \n", r"line 2: empty text"),
        ("\n\n", r"file is empty"),
    ],
)
def test_bad_tsv_names_file_and_line(tmp_path: Path, content: str, message: str):
    path = tmp_path / "SMSSpamCollection"
    path.write_text(content)
    for parse in ("reference", "seed", "exact"):
        with pytest.raises(ValueError, match=message):
            spam.read_sms_collection(path, parse=parse)


def test_reference_parse_reports_a_quoted_empty_text(tmp_path: Path):
    path = tmp_path / "quoted"
    path.write_text('ham\thi\nspam\t""\n')
    with pytest.raises(ValueError, match=r"quoted: row 2: empty text after pandas' quote handling"):
        spam.read_sms_collection(path)
    assert spam.read_sms_collection(path, parse="exact")["Text"].tolist() == ["hi", '""']


def test_reference_parse_reads_a_text_that_pandas_quoted_across_lines(tmp_path: Path):
    frame = pd.DataFrame({"Label": ["ham", "spam", "ham", "spam"], "Text": ["Hello\nsee you at 5", "WIN cash", "ok", "free prize"]})
    path = tmp_path / "multi.tsv"
    frame.to_csv(path, sep="\t", header=False, index=False)  # the first text is written "Hello<newline>see you at 5", quoted
    read = spam.read_sms_collection(path)
    assert read["Text"].tolist() == frame["Text"].tolist() and read["Label"].tolist() == frame["Label"].tolist()
    with pytest.raises(ValueError, match=r"multi.tsv: line 2: no tab"):  # line by line, as documented
        spam.read_sms_collection(path, parse="exact")


def test_old_mac_line_ends_split_lines_in_both_parses(tmp_path: Path):
    path = tmp_path / "mac"
    path.write_bytes(b"ham\thello\rspam\tWIN\rham\tok\rspam\tfree\r")
    for parse in ("reference", "exact"):
        assert spam.read_sms_collection(path, parse=parse)["Text"].tolist() == ["hello", "WIN", "ok", "free"], parse


def test_a_csv_text_over_the_csv_modules_field_limit_is_read(tmp_path: Path):
    path = tmp_path / "long.csv"
    long_text = "win " * 40_000  # 160,000 characters: over csv's default limit of 131,072
    path.write_text(f"Label,Text\nspam,{long_text}\nham,hi\n")
    frame, names = labeled.read_labeled_csv(path)
    assert names == ["ham", "spam"] and frame["Text"].tolist() == [long_text, "hi"]
    assert csv.field_size_limit() == 131_072  # the process-wide limit is restored


def test_one_class_or_a_stray_label_is_named(tmp_path: Path):
    path = tmp_path / "one"
    path.write_text("ham\ta\nham\tb\n")
    with pytest.raises(ValueError, match=r"one: one class only \('ham'\): a classifier needs rows of at least 2 labels"):
        spam.splits(path)
    header = tmp_path / "header.tsv"  # a header line read as data makes a class of one row
    header.write_text("Label\tText\n" + "".join(f"ham\th{i}\n" for i in range(60)) + "".join(f"spam\ts{i}\n" for i in range(60)))
    with pytest.warns(spam.SmallClassWarning, match=r"class 'Label' has only 1 row\(s\): balancing keeps 1 of every class \(3 of 121 rows\)"):
        with pytest.raises(ValueError, match=r"the validation split is empty .*the smallest class, 'Label', has 1 row"):
            spam.splits(header)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real collection's classes (747 and 4,825) balance without a warning
        spam.balance(pd.DataFrame({"Label": ["ham"] * 48 + ["spam"] * 8, "Text": ["t"] * 56}), ["ham", "spam"])


def test_write_splits_is_atomic(tmp_path: Path, real_splits: spam.Splits, monkeypatch):
    from jaxft import fileio

    paths = spam.write_splits(tmp_path, *real_splits.frames())
    before = {name: path.read_bytes() for name, path in paths.items()}

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", full_disk)
    with pytest.raises(fileio.WriteError, match=r"train.csv: cannot write: .*No space left on device"):
        spam.write_splits(tmp_path, real_splits.test, real_splits.test, real_splits.test)
    assert {name: path.read_bytes() for name, path in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.csv", "train.csv", "validation.csv"]  # no temporary left


def test_empty_split_and_missing_file(tmp_path: Path):
    path = tmp_path / "tiny"
    path.write_text("ham\ta\nham\tb\nspam\tc\nspam\td\n")
    with pytest.raises(ValueError, match=r"tiny: the validation split is empty"):
        spam.splits(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        spam.splits(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no SMSSpamCollection"):
        spam.resolve_sms_spam_path(tmp_path)


# ----------------------------------------------------------------------------- one encoding rule


def test_a_literal_end_of_text_in_a_message_is_plain_text(tokenizer):
    text = "win <|endoftext|> now"
    (ids,) = spam.tokenize([text], tokenizer)
    assert ids == encode_text(tokenizer, text) and EOT_ID not in ids
    frame = pd.DataFrame({"Label": [1], "Text": [text]})
    encoded = spam.encode_split(frame, tokenizer)
    assert encoded.tokens[0].tolist() == ids and encoded.lengths.tolist() == [len(ids)]


# ----------------------------------------------------------------------------- labels and quotes


def _one_line_error(call, path: Path, pattern: str) -> str:
    with pytest.raises(ValueError, match=pattern) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


@pytest.mark.parametrize(
    "content, line",
    [
        ('Label,Text\nham,hi\nspam,"win now\nham,later\nham,more\n', 3),  # swallows the rest
        ('Label,Text\nham,hi\n"spam,win\nham,later\n', 3),  # an opening quote in the label
        ('Label,Text\nham,"two\nlines"\nspam,"open\n', 4),  # after a closed multi-line field
    ],
)
def test_unclosed_quote_names_the_file_and_the_line_it_opens(tmp_path: Path, content: str, line: int):
    path = tmp_path / "train.csv"
    path.write_text(content)
    _one_line_error(
        lambda: labeled.read_labeled_csv(path), path, rf"line {line}: a quoted field opens here and is never closed"
    )


def test_quotes_that_close_or_sit_inside_a_field_are_fine(tmp_path: Path):
    path = tmp_path / "ok.csv"
    path.write_text('Label,Text\nham,he said "hi\nspam,"last, ""quoted""\nmessage"\n')
    frame, names = labeled.read_labeled_csv(path)
    assert frame["Text"].tolist() == ['he said "hi', 'last, "quoted"\nmessage'] and names == ["ham", "spam"]


def test_labels_differing_by_case_or_spaces_are_refused_unless_normalized(tmp_path: Path):
    rows = [(" Ham ", "a"), ("SPAM", "b"), ("ham", "c"), ("spam", "d"), ("ham", "e"), ("spam", "f")]
    csv_path = tmp_path / "mixed.csv"
    with csv_path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("Label", "Text"), *rows])
    tsv_path = tmp_path / "mixed"
    tsv_path.write_text("".join(f"{label}\t{text}\n" for label, text in rows * 5))
    pattern = r"labels ' Ham ', 'SPAM', 'ham', 'spam' differ only by case or surrounding spaces.*normalize_labels=True"
    _one_line_error(lambda: labeled.read_labeled_csv(csv_path), csv_path, pattern)
    for parse in ("reference", "exact"):
        _one_line_error(lambda parse=parse: spam.read_sms_collection(tsv_path, parse=parse), tsv_path, pattern)
        _one_line_error(lambda parse=parse: spam.splits(tsv_path, parse=parse), tsv_path, pattern)

    frame, names = labeled.read_labeled_csv(csv_path, normalize_labels=True)
    assert names == ["ham", "spam"] and frame["Label"].tolist() == [0, 1, 0, 1, 0, 1]
    folded = spam.read_sms_collection(tsv_path, normalize_labels=True)
    assert folded["Label"].tolist() == ["ham", "spam"] * 15
    assert spam.splits_with_classes(tsv_path, normalize_labels=True).class_names == ["ham", "spam"]


@pytest.mark.parametrize(
    "ids, detail",
    [((0, 5), r"found 0, 5 \(missing 1, 2, 3, 4\)"), ((1, 2), r"found 1, 2 \(missing 0\)"), ((-1, 0), r"found -1, 0 \(negative ids\)")],
)
def test_integer_labels_must_be_consecutive_class_ids(tmp_path: Path, ids: tuple[int, int], detail: str):
    path = tmp_path / "ints.csv"
    path.write_text("Label,Text\n" + "".join(f"{label},text {i}\n" for i, label in enumerate(ids * 2)))
    pattern = rf"integer labels must be the class ids 0..K-1 with every id present; {detail}"
    _one_line_error(lambda: labeled.read_labeled_csv(path), path, pattern)
    tsv = tmp_path / "ints.tsv"
    tsv.write_text("".join(f"{label}\ttext {i}\n" for i, label in enumerate(ids * 2)))
    _one_line_error(lambda: spam.splits(tsv), tsv, pattern)


def test_a_label_absent_from_training_is_refused(tmp_path: Path):
    train = tmp_path / "train.csv"
    train.write_text("Label,Text\nham,a\nspam,b\n")
    _, names = labeled.read_labeled_csv(train)
    validation = tmp_path / "validation.csv"
    validation.write_text("Label,Text\nham,c\neggs,d\n")
    message = _one_line_error(
        lambda: labeled.read_labeled_csv(validation, names), validation, r"line 3: unknown label 'eggs'"
    )
    assert "training" in message
    # A stray class id among names is not taken as an id either (only a file of ids may give ids).
    test = tmp_path / "test.csv"
    test.write_text("Label,Text\nham,c\n1,d\n")
    _one_line_error(lambda: labeled.read_labeled_csv(test, names), test, r"line 3: unknown label '1'")
    ids_train = tmp_path / "ids.csv"
    ids_train.write_text("Label,Text\n0,a\n1,b\n")
    _, id_names = labeled.read_labeled_csv(ids_train)
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("Label,Text\n0,a\n2,b\n")
    _one_line_error(lambda: labeled.read_labeled_csv(unseen, id_names), unseen, r"line 3: unknown label '2'")
