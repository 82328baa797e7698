"""The GPT-2 BPE tokenizer, built with tiktoken from local files only; one encoding rule.

Search order: an explicit directory holding `encoder.json` + `vocab.bpe` (an OpenAI checkpoint
directory has both), then `$JAXFT_GPT2_VOCAB`, then the vocabulary bundled in `jaxft/assets`.
Never the network, and never tiktoken's cache: the mergeable ranks are built here from the
files' bytes. Every source is checked against the SHA-256 tiktoken itself expects.

User text is encoded with `encode_text`: a literal `<|endoftext|>` in a message is plain text,
never the special token.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from jaxft.assets import check_sha256, read_asset

if TYPE_CHECKING:  # imported where an encoding is built: importing jaxft stays light
    import tiktoken

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
PAD_ID = EOT_ID  # GPT-2 has no pad token; the reference pads with end-of-text

VOCAB_BPE = "vocab.bpe"
ENCODER_JSON = "encoder.json"
# The hashes tiktoken itself expects for the gpt2 encoding's files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_pat_str).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
BUNDLED_DIR = "gpt2_vocab"  # inside jaxft/assets, gzip-compressed

ENV_VAR = "JAXFT_GPT2_VOCAB"


class TokenizerNotFoundError(RuntimeError):
    pass


def _data_gym_bytes() -> tuple[list[int], dict[str, int]]:
    """Bytes in OpenAI's rank order (printable ones first), and the stand-in character
    `vocab.bpe` / `encoder.json` write for each byte (as tiktoken's data-gym loader)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    rest = [b for b in range(256) if b not in printable]
    stand_in = {chr(b): b for b in printable}
    stand_in.update({chr(256 + i): b for i, b in enumerate(rest)})
    return printable + rest, stand_in


def mergeable_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """tiktoken's mergeable ranks from the two files' bytes.

    The same ranking as `tiktoken.load.data_gym_to_mergeable_bpe_ranks`, without its file
    reads (which copy local files into tiktoken's cache, keyed by path).
    """
    order, to_byte = _data_gym_bytes()
    # The single bytes take the first 256 ranks, then every merge in the file's order.
    ranks = {bytes([b]): rank for rank, b in enumerate(order)}

    def decode(token: str) -> bytes:
        return bytes(to_byte[ch] for ch in token)

    for line in vocab_bpe.decode("utf-8").split("\n")[1:-1]:  # a version header, a final newline
        first, second = line.split()
        ranks[decode(first) + decode(second)] = len(ranks)
    encoder = {decode(token): rank for token, rank in json.loads(encoder_json).items()}
    encoder.pop(EOT_TOKEN.encode(), None)
    encoder.pop(b"<|startoftext|>", None)
    # tiktoken relies on ranks following merge priority; encoder.json must agree with the merges.
    if encoder != ranks:
        raise ValueError(f"{ENCODER_JSON} does not agree with {VOCAB_BPE} (not a GPT-2 vocabulary pair)")
    return ranks


@functools.lru_cache(maxsize=4)
def _encoding(vocab_bpe: bytes, encoder_json: bytes) -> tiktoken.Encoding:
    # Cached per content (building takes about a second); bytes hash once per object.
    import tiktoken

    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=mergeable_ranks(vocab_bpe, encoder_json),
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=50257,
    )


@functools.lru_cache(maxsize=1)
def _bundled_files() -> tuple[bytes, bytes]:
    return (
        read_asset(f"{BUNDLED_DIR}/{VOCAB_BPE}.gz", VOCAB_BPE_SHA256),
        read_asset(f"{BUNDLED_DIR}/{ENCODER_JSON}.gz", ENCODER_JSON_SHA256),
    )


def from_files(vocab_dir: str | Path, verify: bool = True) -> tiktoken.Encoding:
    """The GPT-2 encoding from a directory with `encoder.json` and `vocab.bpe`."""
    vocab_dir = Path(vocab_dir)
    bpe, enc = vocab_dir / VOCAB_BPE, vocab_dir / ENCODER_JSON
    for path in (bpe, enc):
        if not path.is_file():
            raise TokenizerNotFoundError(f"{path}: file not found (need {VOCAB_BPE} and {ENCODER_JSON})")
    vocab_bpe, encoder_json = bpe.read_bytes(), enc.read_bytes()
    if verify:
        check_sha256(vocab_bpe, VOCAB_BPE_SHA256, bpe)
        check_sha256(encoder_json, ENCODER_JSON_SHA256, enc)
    return _encoding(vocab_bpe, encoder_json)


def bundled() -> tiktoken.Encoding:
    """The GPT-2 encoding from the vocabulary shipped in `jaxft/assets` (hash-checked)."""
    return _encoding(*_bundled_files())


def get_tokenizer(vocab_dir: str | Path | None = None) -> tiktoken.Encoding:
    """The GPT-2 tokenizer: from `vocab_dir`, else `$JAXFT_GPT2_VOCAB`, else the bundled files."""
    if vocab_dir is not None:
        return from_files(vocab_dir)
    env_dir = os.environ.get(ENV_VAR)
    if env_dir:
        return from_files(env_dir)
    return bundled()


def encode_text(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Token ids of user text; a literal `<|endoftext|>` in it is plain text, not the special token."""
    return tokenizer.encode(text, disallowed_special=())
