"""`jaxft finetune-preference`: DPO from an instruction-tuned model (jaxft.recipes.preference)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..recipes.preference import PreferenceRecipe, data_file, run
from ..timing import Timing
from ..tokenizer import get_tokenizer
from ..train import METRICS_FILE
from .commands import COMMANDS
from .common import add_recipe_command, check_before_work, claimed_run, settings_from_args

GROUPS = {
    "data": "data (default: the reference's instruction-data-with-preference.json)",
    "model": "model (--model: the instruction-tuned model, e.g. runs/sft/model)",
    "preference": "preference (DPO)",
    "training": "training",
    "responses": "responses",
    "output": "output",
}


def _finetune(args: argparse.Namespace) -> int:
    timing = Timing()
    recipe = settings_from_args(PreferenceRecipe, args)
    check_before_work(args, recipe)
    with timing.phase("data_s"):
        tokenizer = get_tokenizer(args.vocab_dir)
    with claimed_run(args, recipe) as rundir:
        metrics = run(recipe, args.out, data_file(recipe), tokenizer, claim=rundir.claim, resume=args.resume, timing=timing)
    if "total_seconds" in metrics:  # process 0, the one that writes the outputs
        print(f"wrote {Path(args.out) / METRICS_FILE} ({metrics['total_seconds'] / 60:.2f} minutes in all)")
    return 0 if np.isfinite(metrics["validation_loss"]) else 1


def register(subparsers: Any) -> None:
    p = add_recipe_command(
        subparsers, "finetune-preference", COMMANDS["finetune-preference"].help,
        PreferenceRecipe(), GROUPS, "output directory: metrics.json, loss and reward-margin plots, both models' responses, model/, run.json, checkpoints/",
    )
    p.set_defaults(func=_finetune, safe_points=True)  # signals are checked at safe points (jaxft.interrupts)
