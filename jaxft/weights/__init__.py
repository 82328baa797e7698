"""Read and write GPT-2 weights in every supported format, detected from the path.

Formats: "openai-tf" (the OpenAI checkpoint directory, read without TensorFlow), "hf"
(Hugging Face `model.safetensors` + `config.json`), "torch-reference" (the PyTorch
reference `GPTModel` state dict, `.pth` or `.safetensors`), "jaxft" (config + params). A torch-reference file written with metadata (a classifier's class
names, padded length, pooling) gets a sidecar `X.pth.jaxft.json` (see jaxft.weights.sidecar).
Every load refuses non-finite weights, naming the tensor.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GPTConfig, from_hparams, get_config, is_size_name
from ..fileio import atomic_write_bytes, atomic_write_text
from ..lora import merge_lora
from ..model import Params
from . import hf, native, sidecar, torch_ref
from .common import WeightsError, check_finite, read_safetensors, safetensors_keys
from .openai import load_openai_checkpoint, save_openai_checkpoint

FORMATS = ("openai-tf", "hf", "torch-reference", "jaxft")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


__all__ = ["FORMATS", "WeightsError", "detect_format", "export", "load", "load_with_metadata", "resolve_config"]


def resolve_config(config: GPTConfig | str | Path | None) -> GPTConfig | None:
    """A GPTConfig from a GPTConfig, a size name ("124M", "gpt2-small"), or an hparams.json path."""
    if config is None or isinstance(config, GPTConfig):
        return config
    text = str(config)
    if is_size_name(text):
        return get_config(text)
    path = Path(text)
    if path.suffix == ".json":
        return from_hparams(path)  # a missing or malformed file: an error naming it
    raise ValueError(f"config {text!r} is neither a GPT-2 size name nor an hparams.json file")


def _layout_of_keys(path: Path, keys: list[str]) -> str:
    if torch_ref.is_reference_state_dict(keys):
        return "torch-reference"
    if hf.is_hf_state_dict(keys):
        return "hf"
    if "wte/embedding" in keys:
        return "jaxft"
    raise WeightsError(f"{path}: unrecognised GPT-2 tensor names (first few: {', '.join(sorted(keys)[:5])})")


def detect_format(path: str | Path) -> str:
    """Which format `path` holds (a directory or a file inside one)."""
    path = Path(path)
    if not path.exists():
        if Path(f"{path}.index").is_file():  # a TF checkpoint prefix such as .../model.ckpt
            return "openai-tf"
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        if native.is_native_dir(path):
            return "jaxft"
        if (path / "model.ckpt.index").is_file() or (path / "hparams.json").is_file():
            return "openai-tf"
        if (path / "model.safetensors").is_file():
            return _layout_of_keys(path, safetensors_keys(path / "model.safetensors"))
        raise WeightsError(
            f"{path}: no GPT-2 checkpoint found (expected model.ckpt.index + hparams.json, "
            "model.safetensors, or a jaxft config.json + params.safetensors)"
        )
    if path.name in ("hparams.json", "checkpoint") or path.name.startswith("model.ckpt"):
        return "openai-tf"
    if path.name == native.CONFIG_FILE:
        return detect_format(path.parent)
    if path.suffix == ".safetensors":
        return _layout_of_keys(path, safetensors_keys(path))
    if path.suffix in TORCH_SUFFIXES:
        return _layout_of_keys(path, list(_torch_load(path)))
    raise WeightsError(f"{path}: unknown checkpoint file type (expected a directory, .safetensors, .pth, .pt or .bin)")


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path}: reading a .pth file needs PyTorch (pip install torch); or convert it to "
            ".safetensors where torch is available"
        ) from None
    try:
        # weights_only: tensors and plain containers only, never arbitrary unpickling.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise WeightsError(
            f"{path}: refused: the file holds Python objects other than tensors{what}, and jaxft reads .pth "
            "files with torch.load(weights_only=True), never a full unpickle; where you trust the file, "
            "re-save just the state dict (torch.save(model.state_dict(), ...)) or convert it to .safetensors"
        ) from None
    except Exception as exc:
        # torch's messages run over several lines; the first one says what went wrong.
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise WeightsError(f"{path}: cannot read PyTorch file ({type(exc).__name__}: {detail})") from None
    return torch_ref.unwrap_state_dict(obj, str(path))


def _read_tensors(path: Path) -> dict[str, Any]:
    if path.suffix in TORCH_SUFFIXES:
        return _torch_load(path)
    return read_safetensors(path)


def _check_same_shape(source: Path, found: GPTConfig, given: GPTConfig | None) -> GPTConfig:
    """A self-describing checkpoint wins; a given config must agree on every dimension."""
    if given is None:
        return found
    for field in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
        if getattr(found, field) != getattr(given, field):
            raise WeightsError(
                f"{source}: the checkpoint has {field}={getattr(found, field)}, but the config says {getattr(given, field)}"
            )
    return found.replace(drop_rate=given.drop_rate)


def load(path: str | Path, config: GPTConfig | str | Path | None = None) -> tuple[GPTConfig, Params]:
    """Load GPT-2 parameters from any supported format -> (config, params as fp32 NumPy arrays).

    `config` (a GPTConfig, a size name or an hparams.json path) is needed only where the
    format cannot carry it: a reference state dict without its sidecar, or HF weights
    without `config.json`. Weights holding NaN or inf are refused (a WeightsError naming the tensor).
    """
    config, params, _ = load_with_metadata(path, config)
    return config, params


def load_with_metadata(
    path: str | Path, config: GPTConfig | str | Path | None = None
) -> tuple[GPTConfig, Params, dict[str, Any] | None]:
    """`load`, and what the format records besides the weights: a jaxft model directory's
    metadata, or a torch-reference file's sidecar's; None where the format records none."""
    source, found, params, metadata = _load(Path(path), resolve_config(config))
    check_finite(str(source), params)
    return found, params, metadata


def _load(path: Path, given: GPTConfig | None) -> tuple[Path, GPTConfig, Params, dict[str, Any] | None]:
    fmt = detect_format(path)
    if fmt == "jaxft":
        directory = path if path.is_dir() else path.parent
        found, params = native.load(directory)
        return directory, _check_same_shape(directory, found, given), params, native.load_metadata(directory)
    if fmt == "openai-tf":
        directory = path if path.is_dir() else path.parent
        found, params = load_openai_checkpoint(directory)
        return directory, _check_same_shape(directory, found, given), params, None

    file = path / "model.safetensors" if path.is_dir() else path
    if fmt == "torch-reference":
        beside = sidecar.read(file)  # before the tensors: a malformed sidecar fails fast
        metadata = None
        if beside is not None:
            recorded, metadata = beside
            given = _check_same_shape(sidecar.path_for(file), recorded, given)
        found, params = torch_ref.state_dict_to_params(given, _read_tensors(file), str(file))
        return file, found, params, metadata
    tensors = _read_tensors(file)
    config_json = file.parent / "config.json"
    if config_json.is_file() and not native.is_native_dir(file.parent):
        found = hf.config_from_hf_json(config_json)
        base = _check_same_shape(file, found, given)
    elif given is not None:
        base = given
    else:
        raise WeightsError(
            f"{file}: Hugging Face weights without a config.json beside them do not record the number of "
            "attention heads; pass config=... (a size name such as 'gpt2-small', an hparams.json, or a GPTConfig; "
            "on the command line, --config)"
        )
    found, params = hf.state_dict_to_params(base, tensors, str(file))
    return file, found, params, None


def export(config: GPTConfig, params: Params, path: str | Path, format: str, metadata: dict[str, Any] | None = None) -> Path:
    """Write `params` to `path` in `format` (one of FORMATS). Returns the path written.

    `metadata` is kept by "jaxft" (in config.json) and "torch-reference" (in the sidecar
    `<path>.jaxft.json`, with the config); "hf" and "openai-tf" have no place for it."""
    path = Path(path)
    if config.lora_rank and format != "jaxft":  # other formats hold plain kernels: fold the adapters in
        config, params = merge_lora(config, params)
    params = _to_numpy(params)
    if format == "jaxft":
        return native.save(config, params, path, metadata)
    if format == "hf":
        import json

        native.save_safetensors(path / "model.safetensors", hf.params_to_state_dict(config, params), {"format": "pt"})
        atomic_write_text(path / "config.json", json.dumps(hf.hf_config_json(config), indent=2) + "\n")
        return path
    if format == "torch-reference":
        state_dict = torch_ref.params_to_state_dict(config, params)
        if path.suffix == ".safetensors":
            native.save_safetensors(path, state_dict, {"format": "pt"})
        elif path.suffix in TORCH_SUFFIXES:
            _torch_save(path, state_dict)
        else:
            raise ValueError(f"{path}: a torch-reference export needs a .pth, .pt or .safetensors file name")
        if metadata:  # what a state dict cannot hold (class names, ...), beside it
            sidecar.write(path, config, metadata)
        else:
            sidecar.remove(path)  # one from an earlier export to this name describes other weights
        return path
    if format == "openai-tf":
        save_openai_checkpoint(config, params, path)
        return path
    raise ValueError(f"unknown weights format {format!r}; choose one of: {', '.join(FORMATS)}")


def _torch_save(path: Path, state_dict: dict[str, np.ndarray]) -> None:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path}: writing .pth needs PyTorch; write .safetensors instead") from None
    import io

    buffer = io.BytesIO()
    # np.array copies: arrays that came from JAX are read-only, which torch.from_numpy warns about.
    torch.save({k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state_dict.items()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _to_numpy(params: Params) -> Params:
    import jax

    return jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), params)
