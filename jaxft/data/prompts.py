"""Prompt styles: how an instruction entry becomes the text a model is trained on and prompted with.

"alpaca" is the reference's format (chapter 7); "phi3" is its exercise 7.1 variant. More
styles can be added with `register_style`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptStyle:
    """How an entry becomes text: `prompt(entry)`, then `response_prefix + output`.

    `response_marker` is stripped from generated text when extracting the response.
    """

    name: str
    format_prompt: Callable[[Mapping[str, Any]], str]
    response_prefix: str
    response_marker: str

    def prompt(self, entry: Mapping[str, Any]) -> str:
        return self.format_prompt(entry)

    def texts(self, entry: Mapping[str, Any]) -> tuple[str, str]:
        """(prompt_text, full_text) where full_text = prompt + response prefix + output."""
        prompt = self.format_prompt(entry)
        return prompt, prompt + self.response_prefix + entry["output"]

    def extract_response(self, generated_text: str, prompt_text: str) -> str:
        """The reference's extraction: text after the prompt, marker removed, whitespace trimmed."""
        return generated_text[len(prompt_text) :].replace(self.response_marker, "").strip()


def _alpaca_prompt(entry: Mapping[str, Any]) -> str:
    text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def _phi3_prompt(entry: Mapping[str, Any]) -> str:
    # As the reference's exercise 7.1 solution: the input follows the instruction on a new line.
    text = f"<|user|>\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n{entry['input']}"
    return text


PROMPT_STYLES: dict[str, PromptStyle] = {}


def register_style(style: PromptStyle) -> PromptStyle:
    """Add (or replace) a prompt style under `style.name`."""
    PROMPT_STYLES[style.name] = style
    return style


register_style(PromptStyle("alpaca", _alpaca_prompt, "\n\n### Response:\n", "### Response:"))
register_style(PromptStyle("phi3", _phi3_prompt, "\n<|assistant|>:\n", "<|assistant|>:"))


def get_style(style: str | PromptStyle) -> PromptStyle:
    if isinstance(style, PromptStyle):
        return style
    try:
        return PROMPT_STYLES[style]
    except KeyError:
        known = ", ".join(sorted(PROMPT_STYLES))
        raise ValueError(f"unknown prompt style {style!r} (known: {known})") from None


def format_entry(entry: Mapping[str, Any], style: str | PromptStyle = "alpaca") -> tuple[str, str]:
    """(prompt_text, full_text) for one entry in the named style."""
    return get_style(style).texts(entry)


def format_prompt(entry: Mapping[str, Any], style: str | PromptStyle = "alpaca") -> str:
    """The prompt text given to the model at generation time."""
    return get_style(style).prompt(entry)


def extract_response(generated_text: str, prompt_text: str, style: str | PromptStyle = "alpaca") -> str:
    return get_style(style).extract_response(generated_text, prompt_text)
