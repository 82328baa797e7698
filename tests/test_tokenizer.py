"""The GPT-2 tokenizer from local or bundled files: ids, hash checks, no network, one encoding rule."""

from __future__ import annotations

import gzip
import shutil
import socket

import pytest
import tiktoken.load

from jaxft import assets
from jaxft import tokenizer as tk


def test_encodes_like_gpt2(shared_data):
    enc = tk.from_files(shared_data / "gpt2_vocab")
    assert enc.encode("Do you have time") == [5211, 345, 423, 640]
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tk.EOT_ID] == [50256]
    text = "Every effort moves you, naïve café — 2024!"
    assert enc.decode(enc.encode(text)) == text


def test_environment_variable_is_used(shared_data, monkeypatch):
    monkeypatch.setenv(tk.ENV_VAR, str(shared_data / "gpt2_vocab"))
    assert tk.get_tokenizer().encode("Hello world") == [15496, 995]


def test_a_tampered_vocabulary_is_refused(shared_data, tmp_path):
    for name in (tk.ENCODER_JSON, tk.VOCAB_BPE):
        shutil.copy(shared_data / "gpt2_vocab" / name, tmp_path / name)
    with open(tmp_path / tk.VOCAB_BPE, "a") as f:
        f.write("x y\n")
    with pytest.raises(ValueError, match=r"vocab\.bpe: SHA-256 .* does not match"):
        tk.from_files(tmp_path)


def test_missing_files_name_what_to_provide(tmp_path, monkeypatch):
    with pytest.raises(tk.TokenizerNotFoundError, match="encoder.json"):
        tk.get_tokenizer(tmp_path)
    monkeypatch.setenv(tk.ENV_VAR, str(tmp_path))  # an explicit choice is never silently replaced
    with pytest.raises(tk.TokenizerNotFoundError, match="vocab.bpe"):
        tk.get_tokenizer()


def test_bundled_vocabulary_offline(tmp_path, monkeypatch):
    """No $JAXFT_GPT2_VOCAB, an empty tiktoken cache, no sockets: the bundled files suffice."""
    monkeypatch.delenv(tk.ENV_VAR, raising=False)
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tk._bundled_files.cache_clear()
    tk._encoding.cache_clear()
    enc = tk.get_tokenizer()
    assert enc.encode("Do you have time") == [5211, 345, 423, 640] and enc.n_vocab == 50257
    assert list(cache.iterdir()) == []  # tiktoken's cache untouched
    assert tk.get_tokenizer() is enc  # built once (about a second), then cached


def test_bundled_vocabulary_is_gpt2s(shared_data):
    for name, expected in ((tk.VOCAB_BPE, tk.VOCAB_BPE_SHA256), (tk.ENCODER_JSON, tk.ENCODER_JSON_SHA256)):
        packed = (assets.ASSETS_DIR / tk.BUNDLED_DIR / f"{name}.gz").read_bytes()
        assert gzip.decompress(packed) == (shared_data / "gpt2_vocab" / name).read_bytes()
        assert assets.read_asset(f"{tk.BUNDLED_DIR}/{name}.gz", expected)
    # The ranks built here from bytes are tiktoken's own, for the same files.
    vocab = shared_data / "gpt2_vocab"
    expected = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(vocab / tk.VOCAB_BPE), str(vocab / tk.ENCODER_JSON))
    assert tk.mergeable_ranks(*tk._bundled_files()) == expected
    assert (assets.ASSETS_DIR / "gpt2_vocab" / "LICENSE").read_text().startswith("Modified MIT License")


def test_a_damaged_bundled_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / tk.BUNDLED_DIR).mkdir()
    for name in (tk.VOCAB_BPE, tk.ENCODER_JSON):
        packed = (assets.ASSETS_DIR / tk.BUNDLED_DIR / f"{name}.gz").read_bytes()
        (tmp_path / tk.BUNDLED_DIR / f"{name}.gz").write_bytes(packed)
    damaged = tmp_path / tk.BUNDLED_DIR / f"{tk.VOCAB_BPE}.gz"
    damaged.write_bytes(gzip.compress(gzip.decompress(damaged.read_bytes()) + b"x y\n"))
    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path)
    monkeypatch.delenv(tk.ENV_VAR, raising=False)
    tk._bundled_files.cache_clear()
    try:
        with pytest.raises(assets.ChecksumError, match=r"vocab\.bpe\.gz: SHA-256 \w+ does not match the expected 1ce16"):
            tk.get_tokenizer()
    finally:
        tk._bundled_files.cache_clear()


def test_encode_text_keeps_special_tokens_as_text(shared_data):
    enc = tk.from_files(shared_data / "gpt2_vocab")
    ids = tk.encode_text(enc, "win <|endoftext|> now")
    assert tk.EOT_ID not in ids and enc.decode(ids) == "win <|endoftext|> now"
    assert ids == enc.encode("win <|endoftext|> now", disallowed_special=())
    assert tk.encode_text(enc, "Do you have time") == [5211, 345, 423, 640]
