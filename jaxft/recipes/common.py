"""What both fine-tuning recipes share: resolving `--model` to (config, params), and refusing a
vocabulary too small for the data."""

from __future__ import annotations

from pathlib import Path

import jax

from .. import sources, weights
from ..config import OPENAI_SIZE_DIRS, GPTConfig, canonical_name, from_hparams, get_config, is_size_name
from ..download import DownloadError
from ..model import Params, init_params

# Where a size name's weights cannot be fetched (offline, say): what else works.
OFFLINE_HINT = (
    "offline? --init random trains from random weights (with --model a size name or an hparams.json), "
    "`jaxft download {size}` fetches the weights where online, and --model DIR uses weights already on disk"
)


def check_vocabulary(model: str, config: GPTConfig, top_id: int, where: str = "the data and its padding use") -> None:
    """Out-of-range ids would train on garbage (NaN losses) rather than fail: refuse them up front."""
    if top_id >= config.vocab_size:
        raise ValueError(
            f"{model}: the model's vocabulary has {config.vocab_size} tokens, too few for the GPT-2 tokenizer "
            f"({where} token ids up to {top_id})"
        )


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
            try:
                checkpoint = sources.gpt2_checkpoint(model, models_dir)  # downloads once
            except DownloadError as exc:
                hint = OFFLINE_HINT.format(size=OPENAI_SIZE_DIRS[canonical_name(model)])  # 124M: what `jaxft download` takes
                raise DownloadError(f"{exc}; {hint}", exc.failures) from None
            config, params = weights.load(checkpoint)
        else:
            raise FileNotFoundError(f"{model}: no such checkpoint, and not a GPT-2 size name")
    if drop_rate is not None:
        config = config.replace(drop_rate=drop_rate)
    return config, params
