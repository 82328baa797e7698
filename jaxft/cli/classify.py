"""`jaxft finetune-classifier` and `jaxft classify`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data import spam
from ..classifier import Classifier
from ..recipes.classify import ClassifierRecipe, load_frames, run
from ..timing import Timing
from ..tokenizer import get_tokenizer
from ..data.labeled import read_text
from .commands import COMMANDS
from .common import CLIError, add_recipe_command, check_before_work, claimed_run, settings_from_args

GROUPS = {"data": "data (default: the SMS Spam Collection)", "model": "model", "training": "training", "output": "output"}


def _finetune(args: argparse.Namespace) -> int:
    timing = Timing()
    recipe = settings_from_args(ClassifierRecipe, args)
    check_before_work(args, recipe)
    start = time.perf_counter()
    with timing.phase("data_s"):
        tokenizer = get_tokenizer(args.vocab_dir)
        frames, class_names, split_here = load_frames(recipe)
    print(f"splits: train {len(frames[0])}, validation {len(frames[1])}, test {len(frames[2])}; classes {class_names}")

    def write_splits() -> None:  # once the directory is ours
        if split_here:
            spam.write_splits(Path(args.out) / "data", *frames)  # the reference's train/validation/test.csv

    with claimed_run(args, recipe, then=write_splits) as rundir:
        metrics = run(recipe, args.out, frames, class_names, tokenizer, claim=rundir.claim, resume=args.resume, timing=timing)
    if "total_seconds" in metrics:  # process 0, the one that writes the outputs
        print(f"wrote {Path(args.out) / 'metrics.json'} ({(time.perf_counter() - start) / 60:.2f} minutes in all)")
    return 0 if np.isfinite(metrics["test_loss"]) else 1


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 file; a missing or undecodable one is a one-line error naming it."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CLIError(f"{path}: is a directory, not a file of texts") from None
    except PermissionError:
        raise CLIError(f"{path}: permission denied") from None
    # a line ends at \n, \r\n or \r only (str.splitlines also splits at form feeds, U+2028, ...)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _classify(args: argparse.Namespace) -> int:
    for i, text in enumerate(args.text):
        if not text.strip():
            raise CLIError(f"text {i + 1} is empty: nothing to classify")
    lines = list(args.text) + (_read_lines(Path(args.file)) if args.file else [])  # read before the model loads
    texts = [line for line in lines if line.strip()]  # a blank line of --file answers with a blank line: lines stay aligned
    if not texts:
        raise CLIError("give text to classify (arguments or --file)" + (f": {args.file} holds no text" if args.file else ""))
    classifier = Classifier.load(args.model, tokenizer=get_tokenizer(args.vocab_dir), config=args.config)
    answers = iter(classifier.probabilities(texts))
    for line in lines:
        if not line.strip():
            print()
            continue
        probs = next(answers)
        label = classifier.class_names[int(np.argmax(probs))]
        print(f"{label}\t{probs.max():.3f}\t{line}" if args.verbose else label)
    return 0


def register(subparsers: Any) -> None:
    p = add_recipe_command(
        subparsers, "finetune-classifier", COMMANDS["finetune-classifier"].help,
        ClassifierRecipe(), GROUPS, "output directory: metrics.json, plots, model/, run.json, checkpoints/",
    )
    p.set_defaults(func=_finetune, safe_points=True)  # signals are checked at safe points (jaxft.interrupts)

    c = subparsers.add_parser("classify", help=COMMANDS["classify"].help)
    c.add_argument("--model", required=True, help="a model directory written by finetune-classifier (its model/ folder)")
    c.add_argument("text", nargs="*", help="texts to classify")
    c.add_argument("--file", help="a file with one text per line (one answer per line; a blank line answers with a blank line)")
    c.add_argument("--vocab-dir", help="directory with GPT-2's encoder.json and vocab.bpe")
    c.add_argument("--config", help="size name or hparams.json, for a reference state dict (.pth), which does not record its shape")
    c.add_argument("-v", "--verbose", action="store_true", help="print probability and text too")
    c.set_defaults(func=_classify)
