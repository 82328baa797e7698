"""jaxft's own format for (fine-tuned) models: a directory with `config.json` + `params.safetensors`.

`config.json` holds {"format": "jaxft", "version": 1, "config": GPTConfig fields,
"metadata": free-form JSON (class names, the padded length, pooling, ...)}. Parameter
keys in the safetensors file are the flat Flax paths ("h_0/attn/c_attn/kernel").
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GPTConfig
from ..fileio import atomic_file, atomic_write_text
from ..model import Params
from .common import WeightsError, check_params, flatten, read_safetensors, unflatten

FORMAT_TAG = "jaxft"
VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"



def is_native_dir(path: Path) -> bool:
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text()).get("format") == FORMAT_TAG
    except (json.JSONDecodeError, AttributeError):
        return False


def save_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import (
        save_file,  # imported here: `import jaxft` works without it
    )

    with atomic_file(path) as tmp:
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        except Exception as exc:  # safetensors reports I/O failures as its own error: "... (os error 28) ..."
            code = re.search(r"\(os error (\d+)\)", str(exc))
            if code is None or isinstance(exc, OSError):
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None


def save(config: GPTConfig, params: Params, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in flatten(params).items()}
    check_params("params", config, flat)
    save_safetensors(path / PARAMS_FILE, flat)
    doc = {"format": FORMAT_TAG, "version": VERSION, "config": config.to_dict(), "metadata": metadata or {}}
    atomic_write_text(path / CONFIG_FILE, json.dumps(doc, indent=2) + "\n")
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    config_file = path / CONFIG_FILE
    try:
        doc = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{config_file}: file not found (not a jaxft model directory)") from None
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{config_file}: not valid JSON ({exc})") from None
    if doc.get("format") != FORMAT_TAG:
        raise WeightsError(f"{config_file}: not a jaxft model config (format={doc.get('format')!r})")
    if doc.get("version") != VERSION:
        raise WeightsError(f"{config_file}: unsupported jaxft format version {doc.get('version')!r}")
    return doc


def load(path: str | Path) -> tuple[GPTConfig, Params]:
    path = Path(path)
    doc = read_header(path)
    try:
        config = GPTConfig.from_dict(doc["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path / CONFIG_FILE}: invalid config ({exc})") from None
    params_file = path / PARAMS_FILE
    if not params_file.is_file():
        raise WeightsError(f"{params_file}: file not found")
    flat = read_safetensors(params_file)
    check_params(str(params_file), config, flat)
    return config, unflatten(flat)


def load_metadata(path: str | Path) -> dict[str, Any]:
    return dict(read_header(path).get("metadata") or {})
