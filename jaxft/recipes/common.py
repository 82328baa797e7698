"""What both fine-tuning recipes share: resolving `--model` to (config, params)."""

from __future__ import annotations

from pathlib import Path

import jax

from .. import sources, weights
from ..config import GPTConfig, from_hparams, get_config, is_size_name
from ..model import Params, init_params


def check_model(model: str, *, init: str = "pretrained") -> None:
    """The cheap part of `resolve_model`'s checks (no file is read, nothing downloaded): a
    one-line error for a `model` that cannot resolve, before any data is read."""
    if init not in ("pretrained", "random"):
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    path = Path(model)
    if path.exists() or is_size_name(model):
        if init == "pretrained" and path.is_file() and path.name == "hparams.json" and not (path.parent / "model.ckpt.index").exists():
            raise ValueError(f"{path}: an hparams.json alone has no weights; pass --init random for a random model of this size")
        return
    if init == "random":
        raise FileNotFoundError(f"{model}: neither a GPT-2 size name nor an existing hparams.json/checkpoint")
    raise FileNotFoundError(f"{model}: no such checkpoint, and not a GPT-2 size name")


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
    check_model(model, init=init)
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
            config, params = weights.load(sources.gpt2_checkpoint(model, models_dir))  # downloads once
        else:
            raise FileNotFoundError(f"{model}: no such checkpoint, and not a GPT-2 size name")
    if drop_rate is not None:
        config = config.replace(drop_rate=drop_rate)
    return config, params
