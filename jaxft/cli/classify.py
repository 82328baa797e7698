"""`jaxft finetune-classifier` and `jaxft classify`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data import spam
from ..recipes.classify import Classifier, ClassifierRecipe, load_frames, run
from ..tokenizer import get_tokenizer
from .common import add_recipe_command, claimed_run, settings_from_args

GROUPS = {"data": "data (default: the SMS Spam Collection)", "model": "model", "training": "training", "output": "output"}


def _finetune(args: argparse.Namespace) -> int:
    recipe = settings_from_args(ClassifierRecipe, args)
    recipe.validate()
    tokenizer = get_tokenizer(args.vocab_dir)
    start = time.perf_counter()
    frames, class_names, split_here = load_frames(recipe)
    print(f"splits: train {len(frames[0])}, validation {len(frames[1])}, test {len(frames[2])}; classes {class_names}")

    def write_splits() -> None:  # once the directory is ours
        if split_here:
            spam.write_splits(Path(args.out) / "data", *frames)  # the reference's train/validation/test.csv

    with claimed_run(args, recipe, then=write_splits) as rundir:
        metrics = run(recipe, args.out, frames, class_names, tokenizer, claim=rundir.claim, resume=args.resume)
    print(f"wrote {Path(args.out) / 'metrics.json'} ({(time.perf_counter() - start) / 60:.2f} minutes in all)")
    return 0 if np.isfinite(metrics["test_loss"]) else 1


def _classify(args: argparse.Namespace) -> int:
    classifier = Classifier.load(args.model, tokenizer=get_tokenizer(args.vocab_dir))
    texts = list(args.text)
    if args.file:
        texts += [line.rstrip("\n") for line in Path(args.file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError("give text to classify (arguments or --file)")
    for text, probs in zip(texts, classifier.probabilities(texts)):
        label = classifier.class_names[int(np.argmax(probs))]
        print(f"{label}\t{probs.max():.3f}\t{text}" if args.verbose else label)
    return 0


def register(subparsers: Any) -> None:
    p = add_recipe_command(
        subparsers, "finetune-classifier", "fine-tune GPT-2 as a text classifier (the reference's SMS spam recipe by default)",
        ClassifierRecipe(), GROUPS, "output directory: metrics.json, plots, model/, run.json, checkpoints/",
    )
    p.set_defaults(func=_finetune)

    c = subparsers.add_parser("classify", help="classify text with a fine-tuned classifier")
    c.add_argument("--model", required=True, help="a model directory written by finetune-classifier (its model/ folder)")
    c.add_argument("text", nargs="*", help="texts to classify")
    c.add_argument("--file", help="a file with one text per line")
    c.add_argument("--vocab-dir", help="directory with GPT-2's encoder.json and vocab.bpe")
    c.add_argument("-v", "--verbose", action="store_true", help="print probability and text too")
    c.set_defaults(func=_classify)
