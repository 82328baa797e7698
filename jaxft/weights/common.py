"""Shared pieces of the weight converters: flat keys, shape checks, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPTConfig
from ..model import Params, param_shapes


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded as asked: names the file and the tensor."""


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"h_0": {"attn": {...}}} -> {"h_0/attn/...": leaf} (dicts and flax FrozenDicts alike)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: dict[str, Any]) -> Params:
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `jaxft.model.GPT2(config)`, flat, with its shape (from the model itself)."""
    return {name: tuple(leaf.shape) for name, leaf in flatten(param_shapes(config)).items()}


def check_keys(source: str, found: Iterable[str], expected: Iterable[str], what: str = "tensor") -> None:
    """Raise one clear error listing missing and unexpected keys."""
    found, expected = set(found), set(expected)
    missing, extra = sorted(expected - found), sorted(found - expected)
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"missing {what}(s): {_short_list(missing)}")
    if extra:
        parts.append(f"unexpected {what}(s): {_short_list(extra)}")
    raise WeightsError(f"{source}: " + "; ".join(parts))


def _short_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_shapes(source: str, tensors: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Each tensor named in `shapes` must have that shape; the error names it as the file does."""
    for name, shape in shapes.items():
        actual = tuple(np.shape(tensors[name]))
        if actual != shape:
            raise WeightsError(f"{source}: tensor {name} has shape {actual}, expected {shape}")


def check_params(source: str, config: GPTConfig, flat: dict[str, Any]) -> None:
    """Keys and shapes of flat params must be exactly those of `config`."""
    shapes = expected_shapes(config)
    check_keys(source, flat, shapes, "parameter")
    for key, shape in shapes.items():
        if tuple(flat[key].shape) != shape:
            raise WeightsError(f"{source}: tensor {key} has shape {tuple(flat[key].shape)}, expected {shape}")


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def check_finite(source: str, params: Params) -> None:
    """Refuse weights holding NaN or inf (they would classify, generate and train on garbage).

    Cheap either way: arrays on a device get one fused reduction over every float leaf (one
    scalar back), the offending tensor looked for only when it fails; host (NumPy) arrays, as
    `load` reads them, one pass each where they lie (copying a model to the device and
    compiling to check it costs 10x more on a CPU: about 0.3 s against 0.03 s for GPT-2 small).
    """
    leaves = {name: leaf for name, leaf in flatten(params).items() if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)}
    if not leaves:
        return
    on_host = all(isinstance(leaf, np.ndarray) for leaf in leaves.values())
    if not on_host and bool(_all_finite(list(leaves.values()))):
        return
    for name, leaf in leaves.items():
        finite = np.isfinite(leaf) if on_host else jnp.isfinite(leaf)
        if on_host and finite.all():
            continue
        bad = int(finite.size - np.count_nonzero(np.asarray(finite)))
        if bad:
            raise WeightsError(
                f"{source}: tensor {name} holds {bad} non-finite value(s) (NaN or inf) of {int(finite.size)}: "
                "refusing weights that cannot compute (was the run that wrote them diverging?)"
            )


def to_float32(source: str, name: str, array: Any) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "fV" and str(array.dtype) != "bfloat16":
        raise WeightsError(f"{source}: tensor {name} has dtype {array.dtype}, expected a float type")
    return np.ascontiguousarray(array.astype(np.float32))


def map_tensors(
    source: str, tensors: dict[str, Any], names: dict[str, str], transform: Callable[[str, Any], Any] | None = None
) -> dict[str, np.ndarray]:
    """Rename `tensors` (source name -> array) by `names` (source name -> flat param key)."""
    check_keys(source, tensors, names)
    out = {}
    for src, dst in names.items():
        value = to_float32(source, src, tensors[src])
        out[dst] = transform(src, value) if transform else value
    return out


def safetensors_problem(path: str | Path) -> str | None:
    """Why a safetensors file cannot be read, naming the first tensor a truncation cuts off.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's
    byte range in the data section, then the data; safetensors' own error names no tensor.
    None when the file does not look truncated (the caller reports the library's error).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"truncated: only {size} bytes, not even the 8-byte header length"
            header_len = int.from_bytes(prefix, "little")
            if 8 + header_len > size:
                return f"truncated inside the header ({size} bytes, the header alone needs {8 + header_len})"
            header = json.loads(f.read(header_len))
    except PermissionError:
        return "permission denied"  # (safetensors itself says "No such file or directory")
    except (OSError, ValueError):
        return None
    data_size = size - 8 - header_len
    ends = sorted(
        (entry["data_offsets"][1], name)
        for name, entry in header.items()
        if isinstance(entry, dict) and "data_offsets" in entry
    )
    cut = [(end, name) for end, name in ends if end > data_size]
    if not cut:
        return None
    end, name = cut[0]
    return (
        f"truncated: tensor {name} needs bytes up to {end} of the data section, which has only {data_size} "
        f"({len(cut)} of {len(ends)} tensors cut off; was the download or copy interrupted?)"
    )


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays; a clear WeightsError when unreadable."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        reason = safetensors_problem(path) or f"cannot read safetensors file ({exc})"
        raise WeightsError(f"{path}: {reason}") from None


def safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file (reads only the header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return list(f.keys())
    except Exception as exc:
        reason = safetensors_problem(path) or f"cannot read safetensors file ({exc})"
        raise WeightsError(f"{path}: {reason}") from None
