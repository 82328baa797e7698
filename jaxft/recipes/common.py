"""What both fine-tuning recipes share: resolving `--model` to (config, params), run metadata."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax

from .. import weights
from ..config import OPENAI_SIZE_DIRS, GPTConfig, canonical_name, from_hparams, get_config, is_size_name
from ..model import init_params

Params = dict[str, Any]


def resolve_model(
    model: str,
    *,
    init: str = "pretrained",
    models_dir: str | Path = "gpt2",
    key: jax.Array | None = None,
    drop_rate: float | None = None,
) -> tuple[GPTConfig, Params]:
    """`model` is a size name ("gpt2-small (124M)", "124M"), a checkpoint path (any format
    `jaxft.load` reads), or an OpenAI-style hparams.json (a custom size).

    init="pretrained" loads weights: from the path, or for a size name from
    `models_dir/<124M|...>`, downloading the OpenAI checkpoint there when absent.
    init="random" starts from GPT-2's random initialisation with `key`.
    """
    if init not in ("pretrained", "random"):
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    path = Path(model)
    if init == "random":
        if is_size_name(model):
            config = get_config(model)
        elif path.is_file() and path.name.endswith(".json") and path.name != "config.json":
            config = from_hparams(path)
        elif path.exists():
            config, _ = weights.load(path)  # a checkpoint's shape, fresh weights
        else:
            raise FileNotFoundError(f"{model}: neither a GPT-2 size name nor an existing hparams.json/checkpoint")
        config = config.replace(num_classes=None)
        params = init_params(config, key if key is not None else jax.random.PRNGKey(0))
    else:
        if path.exists():
            if path.is_file() and path.name == "hparams.json" and not (path.parent / "model.ckpt.index").exists():
                raise ValueError(f"{path}: an hparams.json alone has no weights; pass --init random for a random model of this size")
            config, params = weights.load(path)
        elif is_size_name(model):
            ckpt_dir = Path(models_dir) / OPENAI_SIZE_DIRS[canonical_name(model)]
            if not (ckpt_dir / "model.ckpt.index").is_file():
                from ..download import download_gpt2

                download_gpt2(model, models_dir)
            config, params = weights.load(ckpt_dir)
        else:
            raise FileNotFoundError(f"{model}: no such checkpoint, and not a GPT-2 size name")
    if drop_rate is not None:
        config = config.replace(drop_rate=drop_rate)
    return config, params


def run_info() -> dict[str, Any]:
    """Where and when a run happened (stored with its metrics)."""
    devices = jax.devices()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": devices[0].device_kind if devices else "unknown",
        "python": platform.python_version(),
    }


def write_json(path: Path, data: Any) -> None:
    from ..weights.native import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def on_off(value: str) -> bool:
    """argparse type for on/off flags (1/0, true/false, yes/no, on/off)."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {value!r}")


def add_model_arguments(group: Any, defaults: Any, trainable_help: str, final_norm_help: str) -> None:
    """The model flags both fine-tuning commands share; defaults from the recipe dataclass."""
    group.add_argument("--model", default=defaults.model, help="size name, checkpoint path, or OpenAI-style hparams.json")
    group.add_argument("--init", choices=("pretrained", "random"), default=defaults.init)
    group.add_argument("--models-dir", default=defaults.models_dir, help="where OpenAI checkpoints are (or get downloaded)")
    group.add_argument("--trainable", default=defaults.trainable, help=trainable_help)
    group.add_argument("--final-norm", type=on_off, default=None, help=final_norm_help)
    group.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="add LoRA adapters of this rank (use with --trainable lora)")
    group.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha, help="LoRA scaling numerator (updates scale by alpha / rank)")
    group.add_argument("--drop-rate", type=float, default=defaults.drop_rate)


def add_training_arguments(group: Any, defaults: Any) -> None:
    """The optimisation and evaluation flags both fine-tuning commands share."""
    group.add_argument("--epochs", type=int, default=defaults.epochs)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--lr", type=float, default=defaults.lr)
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--eval-freq", type=int, default=defaults.eval_freq)
    group.add_argument("--eval-iter", type=int, default=defaults.eval_iter)
    group.add_argument("--accumulation-steps", type=int, default=defaults.accumulation_steps)
    group.add_argument("--seed", type=int, default=defaults.seed)
