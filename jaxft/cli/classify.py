"""`jaxft finetune-classifier` and `jaxft classify`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import losses, sources
from ..data import spam
from ..recipes.classify import PADDINGS, Classifier, ClassifierRecipe, run
from ..recipes.common import add_model_arguments, add_training_arguments
from ..tokenizer import get_tokenizer



def _load_frames(args: argparse.Namespace) -> tuple[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame], list[str]]:
    user_files = [args.train, args.validation, args.test]
    if any(user_files):
        if not all(user_files):
            raise ValueError("--train, --validation and --test go together")
        train_df, class_names = spam.read_labeled_csv(args.train)
        val_df, _ = spam.read_labeled_csv(args.validation, class_names=class_names)
        test_df, _ = spam.read_labeled_csv(args.test, class_names=class_names)
    else:
        path = Path(args.data) if args.data else sources.sms_spam_file(download=True, data_dir=args.data_dir)
        dataset = spam.splits_with_classes(path, seed=args.seed, parse=args.parse)
        train_df, val_df, test_df, class_names = dataset.train, dataset.validation, dataset.test, dataset.class_names
        spam.write_splits(Path(args.out) / "data", train_df, val_df, test_df)
    return (train_df, val_df, test_df), class_names


def _finetune(args: argparse.Namespace) -> int:
    recipe = ClassifierRecipe(
        model=args.model,
        init=args.init,
        trainable=args.trainable,
        final_norm=args.final_norm,
        pooling=args.pooling,
        padding=args.padding,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        eval_freq=args.eval_freq,
        eval_iter=args.eval_iter,
        seed=args.seed,
        max_length=args.max_length,
        drop_rate=args.drop_rate,
        accumulation_steps=args.accumulation_steps,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        models_dir=args.models_dir,
        export_pth=args.export_pth,
    )
    recipe.validate()
    tokenizer = get_tokenizer(args.vocab_dir)
    start = time.perf_counter()
    frames, class_names = _load_frames(args)
    print(f"splits: train {len(frames[0])}, validation {len(frames[1])}, test {len(frames[2])}; classes {class_names}")
    metrics = run(recipe, args.out, frames, class_names, tokenizer)
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
    defaults = ClassifierRecipe()
    p = subparsers.add_parser(
        "finetune-classifier",
        help="fine-tune GPT-2 as a text classifier (the seed's SMS spam recipe by default)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("data (default: the SMS Spam Collection, downloaded unless --data is given)")
    data.add_argument("--data", help="a local SMSSpamCollection file (tab-separated label, text)")
    data.add_argument("--data-dir", default="sms_spam_collection", help="where to download the SMS Spam Collection")
    data.add_argument("--parse", choices=("seed", "exact"), default="seed", help="seed: pandas' quote handling (5,572 rows); exact: 5,574")
    data.add_argument("--train", help="CSV with columns Label,Text (with --validation and --test)")
    data.add_argument("--validation", help="validation CSV (Label,Text)")
    data.add_argument("--test", help="test CSV (Label,Text)")
    data.add_argument("--max-length", type=int, default=None, help="pad/truncate to this many tokens (default: longest training text)")
    data.add_argument("--vocab-dir", help="directory with GPT-2's encoder.json and vocab.bpe (default: $JAXFT_GPT2_VOCAB or tiktoken)")
    m = p.add_argument_group("model")
    add_model_arguments(m, defaults, "head | last-block | last-N-blocks | all | lora", "train the final LayerNorm (on/off; default on unless --trainable head)")
    m.add_argument("--pooling", choices=losses.POOLINGS, default=defaults.pooling)
    data.add_argument("--padding", choices=PADDINGS, default=defaults.padding, help="pad to the longest training text, the longest in each batch, or 16-token buckets")
    add_training_arguments(p.add_argument_group("training"), defaults)
    p.add_argument("--out", required=True, help="output directory: metrics.json, plots, model/")
    p.add_argument("--export-pth", action="store_true", help="also write the reference's review_classifier.pth")
    p.set_defaults(func=_finetune)

    c = subparsers.add_parser("classify", help="classify text with a fine-tuned classifier")
    c.add_argument("--model", required=True, help="a model directory written by finetune-classifier (its model/ folder)")
    c.add_argument("text", nargs="*", help="texts to classify")
    c.add_argument("--file", help="a file with one text per line")
    c.add_argument("--vocab-dir", help="directory with GPT-2's encoder.json and vocab.bpe")
    c.add_argument("-v", "--verbose", action="store_true", help="print probability and text too")
    c.set_defaults(func=_classify)
