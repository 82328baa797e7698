"""The OpenAI GPT-2 checkpoint directory (`hparams.json` + TF `model.ckpt.*`), without TensorFlow.

OpenAI variable -> jaxft parameter (see jaxft/model.py):

    model/wte [vocab, d]            -> wte/embedding
    model/wpe [ctx, d]              -> wpe/embedding
    model/h{i}/ln_{1,2}/{g,b}       -> h_{i}/ln_{1,2}/{scale,bias}
    model/h{i}/attn/c_attn/w [1, d, 3d] -> h_{i}/attn/c_attn/kernel [d, 3d]   (and b -> bias)
    model/h{i}/attn/c_proj/w [1, d, d]  -> h_{i}/attn/c_proj/kernel
    model/h{i}/mlp/c_fc/w [1, d, 4d]    -> h_{i}/mlp/c_fc/kernel
    model/h{i}/mlp/c_proj/w [1, 4d, d]  -> h_{i}/mlp/c_proj/kernel
    model/ln_f/{g,b}                -> ln_f/{scale,bias}

The output head is `wte` (tied), so the format holds only tied-head LM configs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..config import GPTConfig, from_hparams
from ..lora import merge_lora
from ..model import Params
from .common import WeightsError, check_params, flatten, to_float32, unflatten
from .tf_bundle import list_bundle, read_bundle, resolve_prefix, write_bundle

HPARAMS_FILE = "hparams.json"
PREFIX_NAME = "model.ckpt"
VOCAB_FILES = ("encoder.json", "vocab.bpe")
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")

__all__ = ["load_openai_checkpoint", "save_openai_checkpoint", "variable_map"]


def variable_map(config: GPTConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{OpenAI variable name: (flat jaxft parameter key, shape in the checkpoint)}."""
    d, v, ctx = config.emb_dim, config.vocab_size, config.context_length
    table = {"model/wte": ("wte/embedding", (v, d)), "model/wpe": ("wpe/embedding", (ctx, d))}

    def norm(tf: str, jx: str) -> None:
        table[f"{tf}/g"] = (f"{jx}/scale", (d,))
        table[f"{tf}/b"] = (f"{jx}/bias", (d,))

    def dense(tf: str, jx: str, n_in: int, n_out: int) -> None:
        table[f"{tf}/w"] = (f"{jx}/kernel", (1, n_in, n_out))  # a 1x1 convolution's kernel
        table[f"{tf}/b"] = (f"{jx}/bias", (n_out,))

    for i in range(config.n_layers):
        tf, jx = f"model/h{i}", f"h_{i}"
        norm(f"{tf}/ln_1", f"{jx}/ln_1")
        dense(f"{tf}/attn/c_attn", f"{jx}/attn/c_attn", d, 3 * d)
        dense(f"{tf}/attn/c_proj", f"{jx}/attn/c_proj", d, d)
        norm(f"{tf}/ln_2", f"{jx}/ln_2")
        dense(f"{tf}/mlp/c_fc", f"{jx}/mlp/c_fc", d, 4 * d)
        dense(f"{tf}/mlp/c_proj", f"{jx}/mlp/c_proj", 4 * d, d)
    norm("model/ln_f", "ln_f")
    return table


def _short(names: list[str], limit: int = 5) -> str:
    return ", ".join(repr(n) for n in names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _check_variables(index: Path, hparams: Path, config: GPTConfig, found: dict[str, tuple[Any, tuple[int, ...]]]) -> None:
    """Every expected variable, no other, each with a float dtype and the shape hparams implies."""
    expected = variable_map(config)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise WeightsError(f"{index}: missing variable(s) {_short(missing)} required by {hparams.name} ({config.n_layers} layers)")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise WeightsError(f"{index}: unexpected variable(s) {_short(extra)}, not part of the GPT-2 that {hparams} describes")
    for name, (_, shape) in expected.items():
        dtype, found_shape = found[name]
        if str(dtype) not in _FLOAT_DTYPES:
            raise WeightsError(f"{index}: variable {name!r} has dtype {dtype}, expected float32 (or float16/bfloat16)")
        if tuple(found_shape) != shape:
            raise WeightsError(
                f"{index}: variable {name!r} has shape {tuple(found_shape)}, but {hparams.name} implies {shape}"
            )


def _read_config(ckpt_dir: Path) -> tuple[Path, GPTConfig]:
    hparams = ckpt_dir / HPARAMS_FILE
    try:
        return hparams, from_hparams(hparams)
    except ValueError as exc:  # e.g. n_embd not divisible by n_head: say which file
        message = str(exc)
        raise WeightsError(message if str(hparams) in message else f"{hparams}: {message}") from None


def load_openai_checkpoint(ckpt_dir: str | os.PathLike, *, verify: bool = True) -> tuple[GPTConfig, Params]:
    """Read an OpenAI GPT-2 checkpoint directory -> (config, params as fp32 NumPy arrays).

    Checks every variable's presence, dtype and shape against `hparams.json` before reading
    any tensor data, then each tensor's stored CRC32C (unless `verify` is False).
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: checkpoint directory not found")
    hparams, config = _read_config(ckpt_dir)
    prefix = resolve_prefix(ckpt_dir)
    index = Path(f"{prefix}.index")
    _check_variables(index, hparams, config, list_bundle(prefix))
    tensors = read_bundle(prefix, verify=verify)
    flat: dict[str, np.ndarray] = {}
    for name, (key, shape) in variable_map(config).items():
        value = to_float32(str(index), name, tensors[name])  # a copy: no ties to the mapped file
        flat[key] = value[0] if len(shape) == 3 else value
    return config, unflatten(flat)


def save_openai_checkpoint(
    config: GPTConfig,
    params: Params,
    ckpt_dir: str | os.PathLike,
    *,
    vocab_dir: str | os.PathLike | None = None,
    dtype: str = "float32",
) -> Path:
    """Write `hparams.json`, `model.ckpt.{index,data-00000-of-00001}` and `checkpoint`.

    OpenAI stored float32; `dtype` may also be "float16" or "bfloat16". With `vocab_dir`,
    its `encoder.json` and `vocab.bpe` are copied beside the weights. No `model.ckpt.meta`
    (a TensorFlow graph) is written: readers of the variables do not need it.
    A config without c_attn biases is written with zero biases (the same function).
    """
    ckpt_dir = Path(ckpt_dir)
    if config.num_classes is not None:
        raise WeightsError(
            f"{ckpt_dir}: the OpenAI checkpoint format has no classification head (num_classes={config.num_classes}); "
            "export as 'jaxft' or 'torch-reference' instead"
        )
    if not config.tie_embeddings:
        raise WeightsError(
            f"{ckpt_dir}: the OpenAI checkpoint format ties the output head to wte, but this config has a "
            "separate lm_head; export as 'hf', 'jaxft' or 'torch-reference' instead"
        )
    if config.layer_norm_eps != 1e-5:
        raise WeightsError(
            f"{ckpt_dir}: the OpenAI format implies layer_norm_eps=1e-5, this config has {config.layer_norm_eps}"
        )
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_FLOAT_DTYPES)}, got {dtype!r}")
    config, params = merge_lora(config, params)  # the format holds plain kernels; adapters would be dropped
    vocab_files = []
    if vocab_dir is not None:
        vocab_files = [Path(vocab_dir) / name for name in VOCAB_FILES]
        for path in vocab_files:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: vocabulary file not found")

    flat = flatten(params)
    if not config.qkv_bias:
        d = config.emb_dim
        flat = {**flat, **{f"h_{i}/attn/c_attn/bias": np.zeros(3 * d, np.float32) for i in range(config.n_layers)}}
        config = config.replace(qkv_bias=True)
    check_params("params", config, flat)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    tensors = {}
    for name, (key, shape) in variable_map(config).items():
        tensors[name] = np.asarray(flat[key], dtype=np.float32).astype(np_dtype).reshape(shape)

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / HPARAMS_FILE).write_text(json.dumps(config.to_hparams(), indent=2) + "\n")
    write_bundle(ckpt_dir / PREFIX_NAME, tensors)
    for path in vocab_files:
        shutil.copyfile(path, ckpt_dir / path.name)
    return ckpt_dir
