"""Every `jaxft` command: the module that registers it and its one-line help. Standard library
only: `jaxft --help` lists the commands from here without importing any command module (nor JAX)."""

from __future__ import annotations

from typing import NamedTuple

EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed (non-finite loss, a write error)
EXIT_USAGE = 2  # a user mistake: bad flag, missing file, malformed data
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Command(NamedTuple):
    module: str
    help: str


COMMANDS = {  # in the order `jaxft --help` lists them
    "download": Command("jaxft.cli.weights", "download an OpenAI GPT-2 checkpoint"),
    "convert": Command("jaxft.cli.weights", "convert GPT-2 weights between formats"),
    "generate": Command("jaxft.cli.weights", "continue a prompt with a GPT-2 model"),
    "finetune-classifier": Command("jaxft.cli.classify", "fine-tune GPT-2 as a text classifier (the reference's SMS spam recipe by default)"),
    "classify": Command("jaxft.cli.classify", "classify text with a fine-tuned classifier"),
    "finetune-instruct": Command(
        "jaxft.cli.instruct", "instruction fine-tune GPT-2 and generate the test split's responses (the reference's Alpaca recipe by default)"
    ),
    "respond": Command("jaxft.cli.instruct", "generate a model_response for every entry of an instruction JSON file with a saved model"),
    "finetune-preference": Command(
        "jaxft.cli.preference",
        "preference-tune (DPO) an instruction-tuned model and generate the test split's responses of it and of the reference model",
    ),
    "judge": Command("jaxft.cli.judge", "score instruction responses with an LLM judge (Ollama or OpenAI-compatible)"),
    "sweep-classifier": Command("jaxft.cli.sweep", "finetune-classifier for every combination of --sweep values, in one vmapped program"),
}
