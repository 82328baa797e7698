"""`jaxft download` (OpenAI checkpoints), `jaxft convert` (any readable weights format to any
writable one) and `jaxft generate`."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .. import generate as generation
from .. import sources
from ..config import GPTConfig
from ..download import DownloadError
from ..lora import merge_lora
from ..model import param_count
from ..settings import run_mesh
from ..tokenizer import (
    ENCODER_JSON,
    EOT_ID,
    VOCAB_BPE,
    TokenizerNotFoundError,
    from_files,
    get_tokenizer,
)
from ..weights import FORMATS, detect_format, export, load, load_with_metadata, resolve_config, sidecar
from ..weights.openai import save_openai_checkpoint
from .commands import COMMANDS
from .common import CLIError

CONFIG_HELP = (
    "a GPT-2 size (124M, gpt2-small, 'gpt2-medium (355M)', ...) or an hparams.json; needed only where "
    "the checkpoint does not record it (a reference state dict, HF weights without config.json)"
)
# Formats written as a directory; "torch-reference" is a single .pth/.safetensors file.
DIRECTORY_FORMATS = ("openai-tf", "hf", "jaxft")


SCAN_HELP = "run the blocks as one jax.lax.scan (compiles one block, not every layer): on, off, auto (off: the scanned decode loop copies each layer's cache slice)"


class MetadataDroppedWarning(UserWarning):
    """A conversion to a format that cannot hold the model's metadata (an instruction model's style, ...)."""


def describe(config: GPTConfig) -> str:
    """One line: the shape of a model."""
    if config.num_classes is not None:
        head = f"classifier head ({config.num_classes} classes)"
    else:
        head = "head tied to wte" if config.tie_embeddings else "separate LM head"
    return (
        f"vocab {config.vocab_size}, context {config.context_length}, {config.emb_dim} wide, "
        f"{config.n_layers} layers, {config.n_heads} heads, {head}"
    )


def _files_written(path: Path) -> str:
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        return f"{path}/ [{', '.join(names)}]"
    return str(path)


def _check_destination(src: Path, dst: Path, fmt: str) -> None:
    if dst.resolve() == src.resolve():
        raise CLIError(f"{dst}: the destination is the source; choose another path")
    if fmt in DIRECTORY_FORMATS and dst.exists() and not dst.is_dir():
        raise CLIError(f"{dst}: exists and is not a directory ({fmt} is written as a directory)")
    if fmt == "torch-reference" and dst.is_dir():
        raise CLIError(f"{dst}: is a directory; torch-reference is one file: give a .pth or .safetensors name")


def _retie_for_openai(config: GPTConfig, params: dict[str, Any]) -> tuple[GPTConfig, dict[str, Any]]:
    """The OpenAI format has no separate LM head. A reference state dict always has one
    (`out_head`), but when it equals wte (weights that came from OpenAI) it can be tied again."""
    if config.tie_embeddings or config.num_classes is not None or "lm_head" not in params:
        return config, params
    if not np.array_equal(np.asarray(params["lm_head"]["kernel"]), np.asarray(params["wte"]["embedding"]).T):
        return config, params  # the writer explains why an untied head cannot be written
    print("note: the separate LM head equals wte, so it is written tied (as OpenAI stores it)")
    return config.replace(tie_embeddings=True), {k: v for k, v in params.items() if k != "lm_head"}


def _vocab_dir_of(path: Path) -> Path | None:
    """The directory beside a checkpoint holding GPT-2's encoder.json + vocab.bpe, if any."""
    directory = path if path.is_dir() else path.parent
    if (directory / ENCODER_JSON).is_file() and (directory / VOCAB_BPE).is_file():
        return directory
    return None


def run_convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    source_format = detect_format(src)
    _check_destination(src, dst, args.to)
    config, params, metadata = load_with_metadata(src, resolve_config(args.config))
    print(f"read {source_format}: {src} ({describe(config)})")
    if config.lora_rank and args.to != "jaxft":
        # Only jaxft holds adapters: fold them in first, so that the openai-tf writer (and the
        # head re-tying before it) and the parameter count see the merged model.
        print(f"note: the LoRA adapters (rank {config.lora_rank}) are merged into the kernels")
        config, params = merge_lora(config, params)
    if args.to == "openai-tf":
        config, params = _retie_for_openai(config, params)
        written = save_openai_checkpoint(config, params, dst, vocab_dir=_vocab_dir_of(src))
    else:
        written = export(config, params, dst, args.to, metadata=metadata)
    print(f"wrote {args.to}: {_files_written(Path(written))}, {param_count(params):,} parameters")
    if metadata and args.to == "torch-reference":
        print(f"wrote {sidecar.path_for(written)} (what the state dict cannot hold: {', '.join(sorted(metadata))}, the config)")
    elif metadata and args.to not in ("jaxft", "torch-reference"):
        warnings.warn(MetadataDroppedWarning(
            f"{args.to} has no place for the model's metadata ({', '.join(sorted(metadata))}): not written; "
            "convert to jaxft or torch-reference to keep it"))
    if args.to == "torch-reference" and config.tie_embeddings and config.num_classes is None:
        print("note: the reference keeps a separate out_head; it is written as a copy of wte")
    return 0


def _tokenizer(args: argparse.Namespace):
    """--vocab-dir, else the checkpoint's own encoder.json + vocab.bpe, else the default lookup."""
    try:
        if args.vocab_dir:
            return get_tokenizer(args.vocab_dir)
        beside = _vocab_dir_of(Path(args.model))
        return from_files(beside) if beside is not None else get_tokenizer()
    except TokenizerNotFoundError as exc:
        raise CLIError(str(exc)) from None


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Checked even when greedy decoding ignores them: a NaN temperature would act greedy,
    a seed outside 64 bits would overflow in jax.random.key."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CLIError(f"--temperature must be >= 0 and finite, got {args.temperature}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not -(2**63) <= args.seed < 2**63:
        raise CLIError(f"--seed must be a signed 64-bit integer (-2**63 to 2**63 - 1), got {args.seed}")


def run_generate(args: argparse.Namespace) -> int:
    _check_sampling_flags(args)  # before a big model loads
    config, params = load(args.model, resolve_config(args.config))
    if config.num_classes is not None:
        raise CLIError(
            f"{args.model}: a classifier ({config.num_classes} classes) cannot generate text; use `jaxft classify`"
        )
    if not args.prompt:
        raise CLIError("--prompt is empty: give some text to continue")
    tokenizer = _tokenizer(args)
    prompt = tokenizer.encode(args.prompt, allowed_special={"<|endoftext|>"})
    if max(prompt) >= config.vocab_size:
        raise CLIError(
            f"{args.model}: the model's vocabulary has {config.vocab_size} tokens, too few for the GPT-2 "
            f"tokenizer (the prompt has token id {max(prompt)})"
        )
    keep = generation.max_prompt_tokens(config, args.max_new_tokens)
    if len(prompt) > keep:
        print(
            f"note: the prompt is {len(prompt)} tokens; the model sees its last {keep} (context length "
            f"{config.context_length} - {args.max_new_tokens} new tokens), dropped the first {len(prompt) - keep}",
            file=sys.stderr,
        )
    sample = args.temperature > 0
    new_ids = generation.generate(
        config,
        params,
        [prompt],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k if sample else None,
        top_p=args.top_p if sample else None,
        eos_id=EOT_ID if config.vocab_size > EOT_ID else None,
        key=jax.random.key(args.seed) if sample else None,
        mesh=run_mesh(args.mesh),
        scan_layers=args.scan_layers,
    )[0]
    print(tokenizer.decode(prompt + new_ids))
    return 0


def run_download(args: argparse.Namespace) -> int:
    try:
        target = sources.gpt2_checkpoint(
            args.size, args.dir, base_urls=args.base_url or None, timeout=args.timeout, progress=not args.quiet, verify=True
        )
    except DownloadError as exc:
        raise CLIError(str(exc)) from None
    print(target)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "download",
        help=COMMANDS["download"].help,
        description="Download the OpenAI GPT-2 checkpoint files (primary URL, then the backup), "
        "skipping complete files and resuming interrupted ones.",
    )
    parser.add_argument(
        "size", metavar="SIZE", help="124M, 355M, 774M or 1558M (or gpt2-small, 'gpt2-small (124M)', ...)"
    )
    parser.add_argument("--dir", default="gpt2", help="models directory; files go to DIR/<124M|...>/ (default: gpt2)")
    parser.add_argument(
        "--base-url",
        metavar="URL",
        nargs="+",
        action="extend",
        help="root URL(s) to try in order instead of the OpenAI primary and backup; a file is fetched "
        "from URL/<124M|...>/<file>",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per network operation (default: 60)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_download)

    convert = subparsers.add_parser(
        "convert",
        help=COMMANDS["convert"].help,
        description=(
            "Read GPT-2 weights in any supported format (detected from SRC: an OpenAI checkpoint directory, "
            "Hugging Face model.safetensors, a PyTorch reference state dict .pth/.safetensors, a jaxft model "
            "directory) and write them to DST in the --to format."
        ),
    )
    convert.add_argument("src", help="the checkpoint to read (a directory or a file)")
    convert.add_argument(
        "dst",
        help="where to write: a directory, or a .pth/.safetensors file for torch-reference (with the model's metadata, "
        "e.g. a classifier's class names, padded length and pooling, and its config in DST.jaxft.json beside it)",
    )
    convert.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    convert.add_argument("--config", help=CONFIG_HELP)
    convert.set_defaults(func=run_convert)

    gen = subparsers.add_parser(
        "generate",
        help=COMMANDS["generate"].help,
        description="Greedy decoding by default; --temperature > 0 samples (with --top-k / --top-p). Stops at <|endoftext|>.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gen.add_argument("--model", required=True, help="a checkpoint in any supported format (directory or file)")
    gen.add_argument("--config", help=CONFIG_HELP)
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=50, help="at most this many tokens after the prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set with this much probability")
    gen.add_argument("--mesh", help="device mesh 'data=D,fsdp=F' (default: every device on data; one device: none)")
    gen.add_argument("--seed", type=int, default=123, help="PRNG seed for sampling")
    gen.add_argument("--scan-layers", choices=("auto", "on", "off"), default="auto", help=SCAN_HELP)
    gen.add_argument(
        "--vocab-dir",
        help="directory with GPT-2's encoder.json and vocab.bpe (default: beside the checkpoint, else "
        "$JAXFT_GPT2_VOCAB, else the bundled copy)",
    )
    gen.set_defaults(func=run_generate)
