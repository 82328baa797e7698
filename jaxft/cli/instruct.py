"""`jaxft finetune-instruct` and `jaxft respond`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import sources, weights
from ..data import instruct as data
from ..recipes.common import add_model_arguments, add_training_arguments, write_json
from ..recipes.instruct import METRICS_FILE, InstructRecipe, generate_responses, load_data, run
from ..tokenizer import get_tokenizer



def _finetune(args: argparse.Namespace) -> int:
    recipe = InstructRecipe(
        model=args.model, init=args.init, trainable=args.trainable, final_norm=args.final_norm, tie_head=args.tie_head,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        eval_freq=args.eval_freq, eval_iter=args.eval_iter, seed=args.seed, style=args.style,
        mask_prompt=args.mask_prompt, allowed_max_length=args.allowed_max_length, limit=args.limit, max_steps=args.max_steps,
        max_new_tokens=args.max_new_tokens, response_batch_size=args.response_batch_size, drop_rate=args.drop_rate,
        accumulation_steps=args.accumulation_steps, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        models_dir=args.models_dir, export_pth=args.export_pth, responses=not args.no_responses,
    )
    recipe.validate()
    entries, source = load_data(args.data, data_dir=args.data_dir, url=args.url)
    tokenizer = get_tokenizer(args.vocab_dir)
    metrics = run(recipe, args.out, entries if args.data is None else source, tokenizer)
    print(f"wrote {Path(args.out) / METRICS_FILE} ({metrics['total_seconds'] / 60:.2f} minutes in all)")
    return 0 if np.isfinite(metrics["final_validation_loss"]) else 1


def _respond(args: argparse.Namespace) -> int:
    from ..weights import native

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
        batch_size=args.batch_size, progress=not args.quiet, source=args.data,
    )
    write_json(Path(args.out), [{**entry, args.response_key: text} for entry, text in zip(entries, responses)])
    print(f"wrote {len(responses)} responses to {args.out} ({time.perf_counter() - start:.1f} s, {style} prompts)")
    return 0


def register(subparsers: Any) -> None:
    defaults = InstructRecipe()
    styles = sorted(data.PROMPT_STYLES)
    p = subparsers.add_parser(
        "finetune-instruct",
        help="instruction fine-tune GPT-2 and generate the test split's responses (the seed's Alpaca recipe by default)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data (default: the seed's instruction-data.json, downloaded unless --data is given)")
    d.add_argument("--data", help="a local JSON list of {instruction, input, output} entries")
    d.add_argument("--data-dir", default=".", help="where to download instruction-data.json when --data is not given")
    d.add_argument("--url", default=sources.INSTRUCTION_DATA_URL, help="download URL of instruction-data.json")
    d.add_argument("--limit", type=int, default=None, help="use only the first N entries (then split 85/10/5)")
    d.add_argument("--style", choices=styles, default=defaults.style, help="prompt style")
    d.add_argument("--mask-prompt", action="store_true", help="also ignore the instruction and input tokens in the loss")
    d.add_argument("--allowed-max-length", type=int, default=defaults.allowed_max_length, help="truncate examples to this many tokens (capped at the context length)")
    d.add_argument("--vocab-dir", help="directory with GPT-2's encoder.json and vocab.bpe (default: $JAXFT_GPT2_VOCAB or tiktoken)")
    m = p.add_argument_group("model")
    add_model_arguments(m, defaults, "all | head | last-block | last-N-blocks | lora", "train the final LayerNorm (on/off; default on unless head/lora)")
    m.add_argument("--tie-head", action="store_true", help="keep the LM head tied to wte (default: a separate head, as the seed's GPTModel)")
    t = p.add_argument_group("training")
    add_training_arguments(t, defaults)
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many training steps (quick runs)")
    g = p.add_argument_group("responses")
    g.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="response length limit (greedy, eos stop)")
    g.add_argument("--response-batch-size", type=int, default=defaults.response_batch_size, help="prompts per generation batch")
    g.add_argument("--no-responses", action="store_true", help="skip generating the test split's responses")
    p.add_argument("--out", required=True, help="output directory: metrics.json, loss plots, responses, model/")
    p.add_argument("--export-pth", action="store_true", help="also write the reference's <model>-sft.pth state dict")
    p.set_defaults(func=_finetune)

    r = subparsers.add_parser(
        "respond",
        help="generate a model_response for every entry of an instruction JSON file with a saved model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument("--model", required=True, help="a model saved by finetune-instruct (its model/ folder) or any checkpoint")
    r.add_argument("--config", help="size name or hparams.json, for checkpoints that do not record their shape")
    r.add_argument("--data", required=True, help="JSON list of {instruction, input[, output]} entries")
    r.add_argument("--out", required=True, help="JSON file to write: the entries with their responses")
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    r.add_argument("--style", choices=styles, default=None, help="prompt style; unset: the one the model was trained with, else alpaca")
    r.add_argument("--response-key", default="model_response", help="field name of the response")
    r.add_argument("--vocab-dir", help="directory with GPT-2's encoder.json and vocab.bpe")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_respond)
