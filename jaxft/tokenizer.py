"""The GPT-2 BPE tokenizer, built with tiktoken from local files when possible.

Search order: an explicit directory holding `encoder.json` + `vocab.bpe` (an OpenAI
checkpoint directory has both), then `$JAXFT_GPT2_VOCAB`, then `tiktoken.get_encoding("gpt2")`
(which needs its cache or the internet). The local files' SHA-256 must match OpenAI's.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import tiktoken
import tiktoken.load

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
PAD_ID = EOT_ID

VOCAB_BPE = "vocab.bpe"
ENCODER_JSON = "encoder.json"
# The hashes tiktoken itself expects for the gpt2 encoding's files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_pat_str).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

ENV_VAR = "JAXFT_GPT2_VOCAB"


class TokenizerNotFoundError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def from_files(vocab_dir: str | Path, verify: bool = True) -> tiktoken.Encoding:
    """The GPT-2 encoding from a directory with `encoder.json` and `vocab.bpe`."""
    vocab_dir = Path(vocab_dir)
    bpe, enc = vocab_dir / VOCAB_BPE, vocab_dir / ENCODER_JSON
    for path in (bpe, enc):
        if not path.is_file():
            raise TokenizerNotFoundError(f"{path}: file not found (need {VOCAB_BPE} and {ENCODER_JSON})")
    if verify:
        for path, expected in ((bpe, VOCAB_BPE_SHA256), (enc, ENCODER_JSON_SHA256)):
            actual = _sha256(path)
            if actual != expected:
                raise ValueError(f"{path}: SHA-256 {actual} does not match GPT-2's {expected}")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(bpe), encoder_json_file=str(enc))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=50257,
    )


def get_tokenizer(vocab_dir: str | Path | None = None) -> tiktoken.Encoding:
    """The GPT-2 tokenizer; see the module docstring for where it looks."""
    if vocab_dir is not None:
        return from_files(vocab_dir)
    env_dir = os.environ.get(ENV_VAR)
    if env_dir:
        return from_files(env_dir)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # tiktoken raises plain network/IO errors when offline
        raise TokenizerNotFoundError(
            "could not load the GPT-2 tokenizer: tiktoken could not fetch it "
            f"({type(exc).__name__}: {exc}). Pass a directory containing {ENCODER_JSON} and "
            f"{VOCAB_BPE} (an OpenAI checkpoint directory has both), or set ${ENV_VAR} to one."
        ) from None


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Encode text, allowing `<|endoftext|>` to appear as the special token."""
    return tokenizer.encode(text, allowed_special={EOT_TOKEN})
