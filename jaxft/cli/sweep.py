"""`jaxft sweep-classifier`: every flag of finetune-classifier, plus --sweep NAME=V1,V2,... (lr,
weight-decay, seed), all combinations trained in one vmapped program (jaxft.sweep)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..recipes.classify import ClassifierRecipe
from ..sweep import parse_sweep
from ..sweep_run import run_sweep
from ..tokenizer import get_tokenizer
from .classify import GROUPS
from .commands import COMMANDS
from .common import CLIError, add_recipe_command, claimed_run, on_off, settings_from_args


def _sweep(args: argparse.Namespace) -> int:
    recipe = settings_from_args(ClassifierRecipe, args)
    recipe.validate(devices=False)  # one device, whatever the host has
    grid = parse_sweep(args.sweep)
    if args.resume:
        raise CLIError("a sweep keeps no checkpoints, so it cannot --resume: run it again (with --overwrite)")
    defaults = ClassifierRecipe().trainer
    for name in ("checkpoint_every", "keep"):  # (finetune-classifier's flags, which a sweep would ignore)
        if getattr(recipe.trainer, name) != getattr(defaults, name):
            raise CLIError(f"a sweep keeps no checkpoints: drop --{name.replace('_', '-')}")
    if not args.sweep_memory_gb > 0:
        raise CLIError(f"sweep-memory-gb must be > 0, got {args.sweep_memory_gb}")
    tokenizer = get_tokenizer(args.vocab_dir)
    start = time.perf_counter()
    with claimed_run(args, recipe) as rundir:
        result = run_sweep(recipe, grid, args.out, tokenizer, memory_gb=args.sweep_memory_gb, save_models=args.sweep_models, claim=rundir.claim)
    print(f"wrote {len(result['runs'])} runs under {Path(args.out) / 'runs'} and {result['summary']} "
          f"({(time.perf_counter() - start) / 60:.2f} minutes in all)")
    return 0


def register(subparsers: Any) -> None:
    p = add_recipe_command(
        subparsers, "sweep-classifier", COMMANDS["sweep-classifier"].help,
        ClassifierRecipe(), GROUPS, "output directory: runs/<name>/ (each as finetune-classifier's), summary.csv, sweep-plot.png, sweep.json",
    )
    g = p.add_argument_group("sweep")
    g.add_argument("--sweep", action="append", required=True, metavar="NAME=V1,V2,...",
                   help="values of lr, weight-decay or seed to sweep (repeat the flag for several; every combination runs)")
    g.add_argument("--sweep-memory-gb", type=float, default=8.0, help="refuse a sweep whose estimated device memory is above this")
    g.add_argument("--sweep-models", type=on_off, default=True, help="save each run's model under runs/<name>/model (on/off)")
    p.set_defaults(func=_sweep)
