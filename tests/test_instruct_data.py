"""Instruction data: loading/validation, split, prompt styles, the reference's collate, buckets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxft.data import instruct, prompts
from jaxft.data.instruct import (
    InstructionDataError,
    bucket_length,
    collate,
    collate_bucketed,
    instruction_batches,
    load_entries,
    split_entries,
    tight_shape,
    tokenize_entries,
)
from jaxft.data.prompts import PromptStyle, extract_response, format_entry
from jaxft.losses import IGNORE_INDEX
from jaxft.tokenizer import PAD_ID, encode_text

REFERENCE_BATCH = ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def masked_ce(logits: np.ndarray, targets: np.ndarray, ignore_index: int = IGNORE_INDEX) -> float:
    """Mean cross-entropy over targets != ignore_index (torch's cross_entropy semantics)."""
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    logp = log_softmax(logits.astype(np.float64))
    picked = logp[np.arange(len(targets)), np.where(keep, targets, 0)]
    return float(-(picked * keep).sum() / keep.sum())


def write(tmp_path: Path, text: str, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def real_entries(shared_data):
    return load_entries(shared_data / "instruction-data.json")


@pytest.fixture(scope="module")
def real_train(real_entries, tokenizer):
    return tokenize_entries(split_entries(real_entries).train, tokenizer, max_length=1024)


# --------------------------------------------------------------------------- collate


def test_collate_reference_example():
    inputs, targets = collate(REFERENCE_BATCH)
    assert isinstance(inputs, np.ndarray) and isinstance(targets, np.ndarray)
    assert np.issubdtype(inputs.dtype, np.integer) and np.issubdtype(targets.dtype, np.integer)
    np.testing.assert_array_equal(
        inputs, [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    )
    np.testing.assert_array_equal(
        targets, [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    )


def test_collate_positional_signature_and_other_ids():
    inputs, targets = collate(REFERENCE_BATCH, 0, -1, None)
    np.testing.assert_array_equal(inputs[1], [5, 6, 0, 0, 0])
    # id 0 is now the pad id: token 0 in example 0 is never a target, so nothing else changes
    np.testing.assert_array_equal(targets[1], [6, 0, -1, -1, -1])
    np.testing.assert_array_equal(targets[0], [1, 2, 3, 4, 0])


def test_collate_allowed_max_length_truncates_like_the_reference():
    inputs, targets = collate(REFERENCE_BATCH, allowed_max_length=3)
    np.testing.assert_array_equal(inputs, [[0, 1, 2], [5, 6, 50256], [7, 8, 9]])
    np.testing.assert_array_equal(targets, [[1, 2, 3], [6, 50256, -100], [8, 9, 50256]])
    # a limit above the batch width changes nothing
    full = collate(REFERENCE_BATCH)
    for a, b in zip(collate(REFERENCE_BATCH, allowed_max_length=1024), full):
        np.testing.assert_array_equal(a, b)


def test_collate_does_not_mutate_and_keeps_the_reference_pad_quirk():
    batch = [[1, 50256, 2], [3]]
    before = [list(x) for x in batch]
    _, targets = collate(batch)
    assert batch == before
    # like the reference: the pad id inside example 0 (target 0) is the "first pad", the appended
    # end-of-text after it is then ignored
    np.testing.assert_array_equal(targets, [[50256, 2, -100], [50256, -100, -100]])


def _reference_collate_lists(batch, pad, ignore, max_len, prompt_lengths):
    """The reference's per-example list algorithm (with its instruction masking), as plain lists."""
    width = max(len(item) + 1 for item in batch)
    xs, ys = [], []
    for k, item in enumerate(batch):
        padded = list(item) + [pad] * (width - len(item))
        x, y = padded[:-1], padded[1:]
        pads = [j for j, t in enumerate(y) if t == pad]
        for j in pads[1:]:
            y[j] = ignore
        if prompt_lengths is not None:
            for j in range(prompt_lengths[k] - 1):
                y[j] = ignore
        if max_len is not None:
            x, y = x[:max_len], y[:max_len]
        xs.append(x)
        ys.append(y)
    return xs, ys


def test_collate_matches_the_reference_algorithm_on_random_batches():
    rng = np.random.default_rng(3)
    for _ in range(200):
        size = int(rng.integers(1, 6))
        batch = [rng.integers(0, 9, size=int(rng.integers(1, 12))).tolist() for _ in range(size)]
        max_len = None if rng.random() < 0.5 else int(rng.integers(1, 14))
        lengths = None if rng.random() < 0.5 else [int(rng.integers(0, len(b) + 2)) for b in batch]
        x, y = collate(batch, 8, -100, max_len, mask_prompt_lengths=lengths)
        ex, ey = _reference_collate_lists(batch, 8, -100, max_len, lengths)
        assert x.tolist() == ex and y.tolist() == ey


def test_collate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(ValueError, match="pad_to=3"):
        collate(REFERENCE_BATCH, pad_to=3)
    with pytest.raises(ValueError, match="2 prompt lengths"):
        collate(REFERENCE_BATCH, mask_prompt_lengths=[1, 2])


def test_reference_loss_example_ignores_minus_100():
    logits_1 = np.array([[-1.0, 1.0], [-0.5, 1.5]])
    logits_2 = np.array([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
    loss_1 = masked_ce(logits_1, np.array([0, 1]))
    loss_2 = masked_ce(logits_2, np.array([0, 1, 1]))
    loss_3 = masked_ce(logits_2, np.array([0, 1, -100]))
    assert loss_1 == pytest.approx(1.1269, abs=1e-4)
    assert loss_2 == pytest.approx(0.7936, abs=1e-4)
    assert loss_3 == pytest.approx(loss_1, abs=1e-12)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7))
    assert masked_ce(logits, np.array([4, 2, -100])) == pytest.approx(masked_ce(logits[:2], np.array([4, 2])))


def test_mask_prompt():
    inputs, targets = collate(REFERENCE_BATCH, mask_prompt_lengths=[3, 1, 2])
    np.testing.assert_array_equal(inputs, collate(REFERENCE_BATCH)[0])
    # targets[j] predicts token j+1: a prompt of n tokens masks the first n-1 targets
    np.testing.assert_array_equal(
        targets, [[-100, -100, 3, 4, 50256], [6, 50256, -100, -100, -100], [-100, 9, 50256, -100, -100]]
    )


def test_mask_prompt_on_real_entry(real_entries, tokenizer):
    data = tokenize_entries(real_entries[:2], tokenizer)
    _, targets = collate(data.token_ids, mask_prompt_lengths=data.prompt_lengths)
    for row, (ids, n_prompt) in enumerate(zip(data.token_ids, data.prompt_lengths)):
        kept = targets[row][targets[row] != IGNORE_INDEX]
        # only the response tokens (after the prompt) and one end-of-text remain
        assert kept.tolist() == ids[n_prompt:] + [PAD_ID]
        response = tokenizer.decode(ids[n_prompt:])
        assert response == "\n\n### Response:\n" + real_entries[row]["output"]


# --------------------------------------------------------------------------- buckets


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 32, 33, 64, 65, 1000, 1024)] == [32, 32, 64, 64, 96, 1024, 1024]
    assert bucket_length(70, multiple=64, max_len=100) == 100
    assert bucket_length(5000, max_len=None) == 5024
    with pytest.raises(ValueError, match="exceeds max_len"):
        bucket_length(1025)
    with pytest.raises(ValueError, match="positive"):
        bucket_length(0)


def test_bucketed_batch_has_same_loss_as_tight():
    rng = np.random.default_rng(1)
    pad = 59  # a small vocabulary (60) keeps the logits small
    batch = [list(rng.integers(0, pad, size=n)) for n in (11, 4, 7, 2)]
    for mask in (None, [3, 2, 5, 1]):
        tight_x, tight_y = collate(batch, pad, mask_prompt_lengths=mask)
        x, y = collate_bucketed(batch, pad, mask_prompt_lengths=mask)
        assert x.shape == y.shape == (4, 32) and tight_x.shape == (4, 11)
        np.testing.assert_array_equal(x[:, :11], tight_x)
        np.testing.assert_array_equal(y[:, :11], tight_y)
        assert (x[:, 11:] == pad).all() and (y[:, 11:] == IGNORE_INDEX).all()
        logits = rng.normal(size=(4, 32, 60))
        assert masked_ce(logits, y) == pytest.approx(masked_ce(logits[:, :11], tight_y), rel=1e-12)
        assert tight_shape(y) == (4, 11)


def test_bucketed_caps_at_allowed_max_length():
    batch = [list(range(100)), [1, 2]]
    x, y = collate_bucketed(batch, allowed_max_length=70)
    assert x.shape == y.shape == (2, 70)
    np.testing.assert_array_equal(x, collate(batch, allowed_max_length=70)[0])


def test_real_train_split_compiles_few_shapes(real_train):
    assert real_train.n_over_length == 0
    shapes, tight, n = set(), set(), 0
    for epoch in range(2):
        for x, y in instruction_batches(real_train, 8, shuffle=True, drop_last=True, seed=123, epoch=epoch):
            shapes.add(x.shape)
            tight.add(tight_shape(y)[1])
            assert x.shape == y.shape and x.shape[1] % 32 == 0
            n += 1
    assert n == 2 * (935 // 8)
    assert len(shapes) <= 8, shapes
    assert len(tight) > 2 * len(shapes)  # the reference's tight padding would compile many more
    print(f"bucketed shapes: {sorted(shapes)}; tight widths: {len(tight)}")


def test_instruction_batches_order_and_last_batch(real_entries, tokenizer):
    val = tokenize_entries(split_entries(real_entries).validation, tokenizer)
    batches = list(instruction_batches(val, 8, shuffle=False, drop_last=False, seed=0, bucket_multiple=None))
    assert [b[0].shape[0] for b in batches] == [8] * 6 + [7]
    # unshuffled, tight: exactly the reference's collate over consecutive slices
    for k, (x, y) in enumerate(batches):
        ex, ey = collate(val.token_ids[8 * k : 8 * k + 8], allowed_max_length=1024)
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    filled = list(instruction_batches(val, 8, shuffle=False, drop_last=False, seed=0, fill_last_batch=True))
    x, y = filled[-1]
    assert x.shape[0] == 8 and (y[7] == IGNORE_INDEX).all() and (x[7] == PAD_ID).all()
    assert tight_shape(y)[0] == 7


def test_shuffle_is_seeded_and_drops_last():
    data = instruct.TokenizedInstructions([[i] for i in range(21)], [1] * 21)

    def firsts(seed, epoch):
        batches = instruction_batches(data, 4, shuffle=True, drop_last=True, seed=seed, epoch=epoch)
        return [x[:, 0].tolist() for x, _ in batches]

    a = firsts(123, 0)
    assert len(a) == 5 and all(len(b) == 4 for b in a)
    assert a == firsts(123, 0)
    assert a != firsts(123, 1) and a != firsts(7, 0)
    assert len({i for b in a for i in b}) == 20


def test_batch_order_matches_array_batching():
    from jaxft.data.batching import batches

    ids = np.arange(21)
    for shuffle, drop_last in ((True, True), (False, False)):
        expected = [b[0].tolist() for b in batches((ids,), 4, shuffle=shuffle, drop_last=drop_last, seed=5, epoch=2)]
        got = instruct.batch_indices(21, 4, shuffle=shuffle, drop_last=drop_last, seed=5, epoch=2)
        assert [g.tolist() for g in got] == expected
    with pytest.raises(ValueError, match="empty"):
        instruct.batch_indices(0, 4, shuffle=False, drop_last=False, seed=0)


# --------------------------------------------------------------------------- real file


def test_real_file_split_and_alpaca_format(real_entries):
    assert len(real_entries) == 1100
    splits = split_entries(real_entries)
    assert (len(splits.train), len(splits.test), len(splits.validation)) == (935, 110, 55)
    assert splits.test[0] == real_entries[935] and splits.validation[0] == real_entries[1045]
    prompt, full = format_entry(real_entries[0])
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n"
        "Evaluate the following phrase by transforming it into the spelling given."
        "\n\n### Input:\nfreind --> friend"
    )
    assert full == prompt + "\n\n### Response:\n" + real_entries[0]["output"]
    # an empty input leaves out the Input section (the reference's data[999])
    prompt, full = format_entry(real_entries[999])
    assert "### Input" not in prompt
    assert full.endswith(
        "What is an antonym of 'complicated'?\n\n### Response:\nAn antonym of 'complicated' is 'simple'."
    )


def test_phi3_style_and_response_extraction(real_entries):
    prompt, full = format_entry(real_entries[50], "phi3")
    assert prompt == "<|user|>\nIdentify the correct spelling of the following word.\nOcassion"
    assert full == prompt + "\n<|assistant|>:\nThe correct spelling is 'Occasion.'"
    prompt, _ = format_entry({"instruction": "Say hi.", "input": "", "output": "Hi."}, "phi3")
    assert prompt == "<|user|>\nSay hi."
    assert extract_response(prompt + "\n<|assistant|>:\n  Hello there. ", prompt, "phi3") == "Hello there."
    alpaca_prompt, _ = format_entry(real_entries[50])
    generated = alpaca_prompt + "\n\n### Response:\nThe correct spelling is 'Occasion'.\n"
    assert extract_response(generated, alpaca_prompt) == "The correct spelling is 'Occasion'."


def test_style_registry():
    with pytest.raises(ValueError, match="unknown prompt style 'nope' \\(known: alpaca, phi3"):
        format_entry({"instruction": "a", "output": "b"}, "nope")
    style = PromptStyle("qa-test", lambda e: f"Q: {e['instruction']}", "\nA: ", "A:")
    try:
        prompts.register_style(style)
        assert format_entry({"instruction": "x", "output": "y"}, "qa-test") == ("Q: x", "Q: x\nA: y")
    finally:
        prompts.PROMPT_STYLES.pop("qa-test", None)
    # The recipes, the CLI and the judge reach the styles through jaxft.data.instruct.
    assert instruct.format_prompt is prompts.format_prompt and instruct.PROMPT_STYLES is prompts.PROMPT_STYLES


def test_tokenize_prompt_lengths_and_phi3(real_entries, tokenizer):
    for style in ("alpaca", "phi3"):
        data = tokenize_entries(real_entries[:3], tokenizer, style)
        for entry, ids, n in zip(real_entries, data.token_ids, data.prompt_lengths):
            prompt, full = format_entry(entry, style)
            assert ids == tokenizer.encode(full) and n == len(tokenizer.encode(prompt))
    # a literal <|endoftext|> in the data is ordinary text, never the eos id
    entry = {"instruction": "<|endoftext|>", "input": "", "output": "x"}
    data = tokenize_entries([entry], tokenizer)
    assert PAD_ID not in data.token_ids[0]
    assert data.token_ids[0] == encode_text(tokenizer, format_entry(entry)[1])  # the one encoding rule


def test_prompt_longer_than_context(tokenizer):
    entries = [
        {"instruction": "short", "output": "ok"},
        {"instruction": "word " * 60, "output": "ok"},
    ]
    message = r"^train\.json: entry 1: prompt is \d+ tokens, longer than the context length 50$"
    with pytest.raises(InstructionDataError, match=message):
        tokenize_entries(entries, tokenizer, max_length=50, source="train.json")
    data = tokenize_entries(entries, tokenizer, max_length=50, too_long="truncate")
    assert len(data) == 2 and data.n_over_length == 1
    x, _ = collate(data.token_ids, allowed_max_length=50)
    assert x.shape == (2, 50)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"data\.json: file is empty$"),
        ("  \n", r"data\.json: file is empty$"),
        ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
         r"data\.json: malformed JSON at line 2, column 22: Expecting ',' delimiter$"),
        ('{"instruction": "a", "output": "b"}', r"data\.json: expected a JSON list of entries, got object$"),
        ("[]", r"data\.json: the list of entries is empty$"),
        ('[{"instruction": "a", "output": "b"}, ["a", "b"]]', r"data\.json: entry 1: expected an object, got list$"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', r"data\.json: entry 1: missing required field 'output'$"),
        ('[{"output": "b"}]', r"data\.json: entry 0: missing required field 'instruction'$"),
        ('[{"instruction": "a", "input": 3, "output": "b"}]', r"data\.json: entry 0: field 'input' must be a string, got int$"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": null}]',
         r"data\.json: entry 1: field 'output' must be a string, got null$"),
        ('[{"instruction": ["a"], "output": "b"}]', r"data\.json: entry 0: field 'instruction' must be a string, got list$"),
    ],
)
def test_bad_files(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(InstructionDataError, match=message) as info:
        load_entries(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_file_and_bad_encoding(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json: file not found$"):
        load_entries(tmp_path / "nope.json")
    path = tmp_path / "latin.json"
    path.write_bytes(b'[{"instruction": "caf\xe9", "output": "b"}]')
    with pytest.raises(InstructionDataError, match=r"latin\.json: not valid UTF-8 \(byte 21\)$"):
        load_entries(path)


def test_input_is_optional_and_extra_fields_kept(tmp_path):
    raw = [
        {"instruction": "a", "output": "b"},
        {"instruction": "a", "input": None, "output": "b", "model_response": "c"},
    ]
    path = write(tmp_path, json.dumps(raw))
    entries = load_entries(path)
    assert entries[0] == {"instruction": "a", "input": "", "output": "b"}
    assert entries[1]["model_response"] == "c" and entries[1]["input"] == ""
    assert load_entries(write(tmp_path, '[{"instruction": "a"}]'), require_output=False)[0]["input"] == ""


def test_json_files_saved_with_a_byte_order_mark_are_read(tmp_path: Path):
    """Windows editors start UTF-8 files with a byte-order mark: the instruction data, a responses
    file for the judge and an hparams.json read as without it."""
    from jaxft import judge
    from jaxft.config import from_hparams

    bom = b"\xef\xbb\xbf"
    entries = [{"instruction": "Say hi.", "input": "", "output": "hi", "model_response": "hi"}]
    data = tmp_path / "data.json"
    data.write_bytes(bom + json.dumps(entries).encode())
    assert instruct.load_entries(data)[0]["output"] == "hi"
    assert judge.load_responses(data)[0]["model_response"] == "hi"
    hparams = tmp_path / "hparams.json"
    hparams.write_bytes(bom + b'{"n_vocab": 50257, "n_ctx": 128, "n_embd": 64, "n_head": 2, "n_layer": 2}')
    assert from_hparams(hparams).emb_dim == 64
