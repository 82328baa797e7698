"""The GPT-2 tokenizer from local files: ids, hash checks, clear errors."""

from __future__ import annotations

import shutil

import pytest

from jaxft import tokenizer as tk


def test_encodes_like_gpt2(shared_data):
    enc = tk.from_files(shared_data / "gpt2_vocab")
    assert enc.encode("Do you have time") == [5211, 345, 423, 640]
    assert enc.n_vocab == 50257
    assert tk.encode(enc, "<|endoftext|>") == [tk.EOT_ID] == [50256]
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
    # Neither local files nor tiktoken's download (no network here): one clear error.
    monkeypatch.delenv(tk.ENV_VAR, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))

    def offline(name):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(tk.tiktoken, "get_encoding", offline)
    with pytest.raises(tk.TokenizerNotFoundError, match="JAXFT_GPT2_VOCAB"):
        tk.get_tokenizer()
