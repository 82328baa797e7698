"""`jaxft finetune-instruct` and `jaxft respond`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import weights
from ..data import instruct as data
from ..recipes.instruct import (
    METRICS_FILE,
    InstructRecipe,
    data_file,
    run,
)
from ..responses import generate_responses
from ..settings import run_mesh
from ..timing import Timing
from ..tokenizer import get_tokenizer
from ..fileio import check_writable, write_json
from ..weights import native
from .commands import COMMANDS
from .weights import SCAN_HELP
from .common import CLIError, add_recipe_command, check_before_work, claimed_run, settings_from_args

GROUPS = {
    "data": "data (default: the reference's instruction-data.json)",
    "model": "model",
    "training": "training",
    "responses": "responses",
    "output": "output",
}


def _finetune(args: argparse.Namespace) -> int:
    timing = Timing()
    recipe = settings_from_args(InstructRecipe, args)
    check_before_work(args, recipe)
    with timing.phase("data_s"):
        tokenizer = get_tokenizer(args.vocab_dir)
    with claimed_run(args, recipe) as rundir:
        metrics = run(recipe, args.out, data_file(recipe), tokenizer, claim=rundir.claim, resume=args.resume, timing=timing)
    if "total_seconds" in metrics:  # process 0, the one that writes the outputs
        print(f"wrote {Path(args.out) / METRICS_FILE} ({metrics['total_seconds'] / 60:.2f} minutes in all)")
    return 0 if np.isfinite(metrics["final_validation_loss"]) else 1


def _respond(args: argparse.Namespace) -> int:
    out = Path(args.out)  # checked before any work: the responses are written last
    check_writable(out)  # first: a directory on the way that may not be searched is named
    if out.is_dir():
        raise CLIError(f"{out}: is a directory; --out is the JSON file to write")
    if out.exists() and not args.overwrite and not _is_responses_file(out, args.response_key):
        raise CLIError(f"{out}: exists and is not a responses file (a JSON list of entries with {args.response_key!r}); "
                       "pass --overwrite to replace it or choose another --out")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    entries = data.load_entries(args.data, require_output=False)  # cheap checks before a big model loads
    config, params = weights.load(args.model, args.config)
    if config.num_classes is not None:
        raise ValueError(f"{args.model}: a classification model, not a language model")
    model_dir = Path(args.model)
    metadata = native.load_metadata(model_dir) if model_dir.is_dir() and native.is_native_dir(model_dir) else {}
    style = args.style or metadata.get("style", "alpaca")
    data.get_style(style)
    if args.max_new_tokens >= config.context_length:
        raise ValueError(f"max-new-tokens ({args.max_new_tokens}) must be smaller than the context length ({config.context_length})")
    tokenizer = get_tokenizer(args.vocab_dir)
    start = time.perf_counter()
    responses = generate_responses(
        config, params, entries, tokenizer, style=style, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, progress=not args.quiet, source=args.data, mesh=run_mesh(args.mesh),
        scan_layers=args.scan_layers,
    )
    write_json(out, [{**entry, args.response_key: text} for entry, text in zip(entries, responses)])
    print(f"wrote {len(responses)} responses to {args.out} ({time.perf_counter() - start:.1f} s, {style} prompts)")
    return 0


def _is_responses_file(path: Path, key: str) -> bool:
    """Whether `path` holds what `respond` writes (a rerun may replace it without --overwrite)."""
    try:
        entries = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(entries, list) and bool(entries) and all(isinstance(e, dict) and key in e for e in entries)


def register(subparsers: Any) -> None:
    styles = sorted(data.PROMPT_STYLES)
    p = add_recipe_command(
        subparsers, "finetune-instruct", COMMANDS["finetune-instruct"].help,
        InstructRecipe(), GROUPS, "output directory: metrics.json, loss plots, responses, model/, run.json, checkpoints/",
    )
    p.set_defaults(func=_finetune, safe_points=True)  # signals are checked at safe points (jaxft.interrupts)

    r = subparsers.add_parser(
        "respond",
        help=COMMANDS["respond"].help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument("--model", required=True, help="a model saved by finetune-instruct (its model/ folder) or any checkpoint")
    r.add_argument("--config", help="size name or hparams.json, for checkpoints that do not record their shape")
    r.add_argument("--data", required=True, help="JSON list of {instruction, input[, output]} entries")
    r.add_argument("--out", required=True, help="JSON file to write: the entries with their responses")
    r.add_argument("--overwrite", action="store_true", help="replace an --out that is not a previous responses file")
    r.add_argument("--max-new-tokens", type=int, default=256, help="at most this many tokens per response")
    r.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    r.add_argument("--style", choices=styles, default=None, help="prompt style; unset: the one the model was trained with, else alpaca")
    r.add_argument("--response-key", default="model_response", help="field name of the response")
    r.add_argument("--vocab-dir", help="directory with GPT-2's encoder.json and vocab.bpe")
    r.add_argument("--mesh", help="device mesh 'data=D,fsdp=F' splitting each batch of prompts (default: every device on data)")
    r.add_argument("--scan-layers", choices=("auto", "on", "off"), default="auto", help=SCAN_HELP)
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_respond)
