"""Responses of an instruction-tuned model: prompts in the recipe's style, batched KV-cached
generation with an eos stop, and the response cut out of the generated text as the reference
does; the reference's per-epoch sample."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import generate as gen
from .config import GPTConfig
from .data import instruct as data
from .model import Params
from .tokenizer import EOT_ID, encode_text

Entry = dict[str, Any]
SAMPLE_NEW_TOKENS = 50  # the reference's generate_and_print_sample after each epoch
SHOWN_ENTRIES = 5  # entry indices a note names


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def encode_prompts(
    entries: Sequence[Entry], tokenizer: Any, style: str, context_length: int, source: str | Path = "<data>"
) -> tuple[list[str], list[list[int]]]:
    """(prompt texts, their token ids); a prompt longer than the context names its entry."""
    texts, ids = [], []
    for index, entry in enumerate(entries):
        text = data.format_prompt(entry, style)
        tokens = encode_text(tokenizer, text)  # as the training texts are encoded
        if len(tokens) > context_length:
            raise data.InstructionDataError(
                f"{source}: entry {index}: prompt is {len(tokens)} tokens, longer than the context length {context_length}"
            )
        texts.append(text)
        ids.append(tokens)
    return texts, ids


def generate_responses(
    config: GPTConfig,
    params: Params,
    entries: Sequence[Entry],
    tokenizer: Any,
    *,
    style: str = "alpaca",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    source: str | Path = "<data>",
    mesh: Any = None,
    log: Callable[[str], None] = _stderr,
    scan_layers: bool | str = False,
) -> list[str]:
    """The reference's response for every entry: greedy until eos or `max_new_tokens`, the text
    after the prompt with the style's response marker removed. Batched, KV-cached; with a
    device `mesh`, each batch is split over its devices. Prompts longer than the context
    leaves beside `max_new_tokens` keep their last tokens: one note line says which, to `log`."""
    texts, prompts = encode_prompts(entries, tokenizer, style, config.context_length, source)
    keep = gen.max_prompt_tokens(config, max_new_tokens)
    cut = [i for i, ids in enumerate(prompts) if len(ids) > keep]
    if cut:  # generate() cuts them silently; the responses then answer a prompt without its start
        shown = ", ".join(map(str, cut[:SHOWN_ENTRIES])) + (", ..." if len(cut) > SHOWN_ENTRIES else "")
        log(
            f"note: {len(cut)} of {len(prompts)} prompts are longer than {keep} tokens (context length "
            f"{config.context_length} - {max_new_tokens} new tokens); the model sees their last {keep} "
            f"({'entry' if len(cut) == 1 else 'entries'} {shown})"
        )
    new_tokens = gen.generate_batched(
        config, params, prompts, batch_size=batch_size, progress=progress, max_new_tokens=max_new_tokens, eos_id=EOT_ID,
        mesh=mesh, scan_layers=scan_layers,
    )
    return [
        data.extract_response(tokenizer.decode(ids + new), text, style)
        for text, ids, new in zip(texts, prompts, new_tokens)
    ]


def sample_text(config: GPTConfig, params: Params, tokenizer: Any, prompt_text: str, max_new_tokens: int = SAMPLE_NEW_TOKENS) -> str:
    """The reference's generate_and_print_sample: prompt + greedy tokens (no eos stop), on one line."""
    prompt = encode_text(tokenizer, prompt_text)
    new = gen.generate(config, params, [prompt], max_new_tokens=min(max_new_tokens, config.context_length - 1), eos_id=None)[0]
    return tokenizer.decode(prompt + new).replace("\n", " ")
