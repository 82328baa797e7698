"""jaxft.responses: prompts longer than the context leaves beside the new tokens are cut to
their last tokens by generate(); generate_responses says so, in one note line."""

from __future__ import annotations

import jax
import pytest

from jaxft.config import GPTConfig
from jaxft.data import instruct
from jaxft.model import init_params
from jaxft.responses import generate_responses
from jaxft.tokenizer import encode_text

CONFIG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=16, n_layers=1, n_heads=2)
MAX_NEW = 16  # prompts keep their last 64 - 16 = 48 tokens


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def _entries(tokenizer, long_at: set[int], n: int) -> list[dict]:
    """n entries; those at `long_at` have prompts of 49..64 tokens (cut, yet within the context)."""
    entries = [{"instruction": "Say hi." if i not in long_at else "word " * 25, "input": "", "output": ""} for i in range(n)]
    lengths = [len(encode_text(tokenizer, instruct.format_prompt(e, "alpaca"))) for e in entries]
    assert all((48 < length <= 64) == (i in long_at) for i, length in enumerate(lengths)), lengths
    return entries


def test_cut_prompts_get_one_note_naming_the_entries(params, tokenizer):
    lines: list[str] = []
    entries = _entries(tokenizer, {1, 3}, 4)
    responses = generate_responses(CONFIG, params, entries, tokenizer, max_new_tokens=MAX_NEW, progress=False, log=lines.append)
    assert len(responses) == 4
    assert lines == [(
        "note: 2 of 4 prompts are longer than 48 tokens (context length 64 - 16 new tokens); the model sees their "
        "last 48 (entries 1, 3)"
    )]


def test_the_note_goes_to_stderr_and_names_the_first_few(params, tokenizer, capsys):
    entries = _entries(tokenizer, {0, 2, 3, 4, 5, 6, 7}, 8)
    generate_responses(CONFIG, params, entries, tokenizer, max_new_tokens=MAX_NEW, progress=False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: 7 of 8 prompts") and "(entries 0, 2, 3, 4, 5, ...)" in err


def test_no_note_when_every_prompt_fits(params, tokenizer):
    lines: list[str] = []
    generate_responses(CONFIG, params, _entries(tokenizer, set(), 2), tokenizer, max_new_tokens=MAX_NEW, progress=False,
                       log=lines.append)
    assert lines == []
