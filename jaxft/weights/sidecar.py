"""What a torch-reference file cannot hold, in a small JSON file beside it.

A reference state dict (`X.pth`, or `X.safetensors` in the reference's layout) records tensors
only: no head count, and for a classifier no class names, trained padded length or pooling.
`export(..., "torch-reference", metadata=...)` writes them to `X.pth.jaxft.json`:

    {"format": "jaxft-sidecar", "version": 1, "weights": "X.pth", "sha256": <of X.pth>,
     "config": GPTConfig fields, "metadata": the model directory's metadata}

and `load` reads them back. The SHA-256 ties the sidecar to the bytes it describes: a weights
file replaced since (re-saved from PyTorch, say) gets a one-line warning and is read as a
plain state dict, never with another model's class names.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from ..config import GPTConfig
from ..fileio import atomic_write_text
from .common import WeightsError

SUFFIX = ".jaxft.json"
FORMAT_TAG = "jaxft-sidecar"
VERSION = 1


class StaleSidecarWarning(UserWarning):
    """A sidecar written for other bytes than the weights file now beside it: not used."""


def path_for(weights_file: str | Path) -> Path:
    """`X.pth` -> `X.pth.jaxft.json`."""
    weights_file = Path(weights_file)
    return weights_file.with_name(weights_file.name + SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write(weights_file: str | Path, config: GPTConfig, metadata: dict[str, Any]) -> Path:
    """Write the sidecar of `weights_file` (already written: its hash is recorded)."""
    weights_file = Path(weights_file)
    doc = {
        "format": FORMAT_TAG,
        "version": VERSION,
        "weights": weights_file.name,
        "sha256": _sha256(weights_file),
        "config": config.to_dict(),
        "metadata": metadata,
    }
    path = path_for(weights_file)
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


def remove(weights_file: str | Path) -> None:
    """Drop a sidecar left by an earlier export to the same name (it describes other weights)."""
    path_for(weights_file).unlink(missing_ok=True)


def read(weights_file: str | Path) -> tuple[GPTConfig, dict[str, Any]] | None:
    """(config, metadata) from the sidecar of `weights_file`; None when there is none, or when
    it was written for other bytes (a one-line warning). A malformed one: a WeightsError."""
    weights_file = Path(weights_file)
    path = path_for(weights_file)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: unreadable jaxft sidecar ({exc}); remove it to read {weights_file.name} as a plain state dict") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_TAG or doc.get("version") != VERSION:
        raise WeightsError(f"{path}: not a version-{VERSION} jaxft sidecar; remove it to read {weights_file.name} as a plain state dict")
    if doc.get("sha256") != _sha256(weights_file):
        warnings.warn(StaleSidecarWarning(
            f"{path} was written for other bytes than {weights_file.name} (SHA-256 differs): not used, so the "
            "classes are numbered and the shape needs --config"), stacklevel=3)
        return None
    try:
        config = GPTConfig.from_dict(doc["config"])
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata is a {type(metadata).__name__}, not an object")
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: invalid jaxft sidecar ({exc})") from None
    return config, dict(metadata)
