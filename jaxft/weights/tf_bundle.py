"""TensorFlow's tensor-bundle format (V2 checkpoints), read and written without TensorFlow.

A checkpoint with prefix `P` is two kinds of file:

* `P.index`: a LevelDB-style table (SSTable). Key "" holds a `BundleHeaderProto`
  (num_shards, endianness, version); every other key is a tensor name whose value is a
  `BundleEntryProto` (dtype, shape, shard_id, offset, size, masked CRC32C of the bytes).
* `P.data-0000S-of-0000N`: the raw little-endian tensor bytes, at the offsets above.

The index is read and written by jaxft.weights.tf_index (a small protobuf wire-format parser,
no protobuf dependency), and every block and tensor checksum is verified (jaxft.weights.crc32c:
pure NumPy, or Google's C `google_crc32c` when it happens to be installed).
Data files are memory-mapped, so a 6 GB checkpoint is never read into memory twice.

These modules depend only on NumPy (and ml_dtypes for bfloat16), so that
`scripts/make_tf_fixtures.py` can load them inside a TensorFlow environment without jax.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

try:  # ships with jax and tensorflow; needed only for bfloat16 tensors
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

from ..fileio import atomic_file, atomic_write_bytes
from .crc32c import crc32c, mask_crc, unmask_crc
from .tf_index import (
    BundleError,
    build_table,
    field_bytes,
    field_fixed32,
    field_varint,
    last_field,
    parse_message,
    signed64,
    table_entries,
)

__all__ = [
    "BundleError",
    "TensorEntry",
    "crc32c",
    "list_bundle",
    "read_bundle",
    "read_entries",
    "resolve_prefix",
    "write_bundle",
    "write_checkpoint_file",
]


# --------------------------------------------------------------------------------------
# Tensor metadata
# --------------------------------------------------------------------------------------

# TensorFlow DataType enum -> NumPy dtype (the fixed-size numeric types).
_TF_TO_NUMPY: dict[int, Any] = {
    1: np.float32,  # DT_FLOAT
    2: np.float64,  # DT_DOUBLE
    3: np.int32,  # DT_INT32
    4: np.uint8,  # DT_UINT8
    5: np.int16,  # DT_INT16
    6: np.int8,  # DT_INT8
    9: np.int64,  # DT_INT64
    10: np.bool_,  # DT_BOOL
    17: np.uint16,  # DT_UINT16
    19: np.float16,  # DT_HALF
    22: np.uint32,  # DT_UINT32
    23: np.uint64,  # DT_UINT64
}
if ml_dtypes is not None:
    _TF_TO_NUMPY[14] = ml_dtypes.bfloat16  # DT_BFLOAT16
_NUMPY_TO_TF = {np.dtype(v): k for k, v in _TF_TO_NUMPY.items()}
_TF_NAMES = {7: "DT_STRING", 8: "DT_COMPLEX64", 18: "DT_COMPLEX128", 20: "DT_RESOURCE", 21: "DT_VARIANT", 14: "DT_BFLOAT16"}


@dataclass(frozen=True)
class TensorEntry:
    """One BundleEntryProto. `dtype` is None for types this module cannot decode."""

    name: str
    tf_dtype: int
    dtype: np.dtype | None
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    sliced: bool

    @property
    def dtype_name(self) -> str:
        return str(self.dtype) if self.dtype is not None else _TF_NAMES.get(self.tf_dtype, f"DataType {self.tf_dtype}")


def _parse_entry(name: str, value: bytes, where: str) -> TensorEntry:
    fields = parse_message(value, where)
    tf_dtype = last_field(fields, 1)
    shape_fields = parse_message(last_field(fields, 2, b""), where)
    if last_field(shape_fields, 3):
        raise BundleError(f"{where}: tensor {name!r} has an unknown rank")
    shape = tuple(signed64(last_field(parse_message(dim, where), 1)) for dim in shape_fields.get(2, []))
    if any(d < 0 for d in shape):
        raise BundleError(f"{where}: tensor {name!r} has an unknown dimension in shape {shape}")
    dtype = _TF_TO_NUMPY.get(tf_dtype)
    return TensorEntry(
        name=name,
        tf_dtype=tf_dtype,
        dtype=np.dtype(dtype) if dtype is not None else None,
        shape=shape,
        shard_id=last_field(fields, 3),
        offset=signed64(last_field(fields, 4)),
        size=signed64(last_field(fields, 5)),
        crc32c=last_field(fields, 6),
        sliced=bool(fields.get(7)),
    )


def _encode_entry(dtype: int, shape: tuple[int, ...], offset: int, size: int, crc: int) -> bytes:
    dims = b"".join(field_bytes(2, field_varint(1, d)) for d in shape)
    return (
        field_varint(1, dtype)
        + field_bytes(2, dims)
        + field_varint(4, offset)
        + field_varint(5, size)
        + field_fixed32(6, mask_crc(crc))
    )


_BUNDLE_VERSION = 1  # TensorFlow's kTensorBundleVersion
_HEADER = field_varint(1, 1) + field_bytes(3, field_varint(1, _BUNDLE_VERSION))  # 1 shard, little-endian


# --------------------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------------------


def _data_path(prefix: Path, shard: int, num_shards: int) -> Path:
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


def _index_path(prefix: Path) -> Path:
    return Path(f"{prefix}.index")


def read_entries(prefix: str | os.PathLike) -> tuple[int, dict[str, TensorEntry]]:
    """Parse `prefix.index` -> (num_shards, {tensor name: TensorEntry}). Reads no tensor data."""
    prefix = Path(prefix)
    path = _index_path(prefix)
    entries: dict[str, TensorEntry] = {}
    header = None
    for key, value in table_entries(path):
        if key == b"":
            header = parse_message(value, f"{path}: header")
            continue
        name = key.decode("utf-8", errors="replace")
        entries[name] = _parse_entry(name, value, f"{path}: entry {name!r}")
    if header is None:
        raise BundleError(f"{path}: no bundle header (not a V2 TensorFlow checkpoint index)")
    num_shards = last_field(header, 1)
    if last_field(header, 2) != 0:
        raise BundleError(f"{path}: big-endian checkpoints are not supported")
    version = parse_message(last_field(header, 3, b""), f"{path}: header")
    if last_field(version, 3) > _BUNDLE_VERSION:
        raise BundleError(f"{path}: needs a reader of bundle version >= {last_field(version, 3)} (this is {_BUNDLE_VERSION})")
    for entry in entries.values():
        if not 0 <= entry.shard_id < max(num_shards, 1):
            raise BundleError(f"{path}: tensor {entry.name!r} is in shard {entry.shard_id}, but there are {num_shards}")
    return num_shards, entries


def list_bundle(prefix: str | os.PathLike) -> dict[str, tuple[np.dtype | str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)}. dtype is a NumPy dtype, or TF's type name where this
    module cannot decode the type (e.g. "DT_STRING")."""
    _, entries = read_entries(prefix)
    return {name: (e.dtype if e.dtype is not None else e.dtype_name, e.shape) for name, e in entries.items()}


def _map_shard(path: Path) -> np.ndarray:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint data file not found") from None
    if size == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _progress(total: int, desc: str):
    if total < 64 * 2**20:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - TF-only environments
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


def read_bundle(
    prefix: str | os.PathLike, names: list[str] | None = None, *, verify: bool = True
) -> dict[str, np.ndarray]:
    """Read tensors (all, or `names`) -> {name: read-only array backed by the mapped file}.

    Every tensor's size and (when `verify`) CRC32C is checked; copy an array to modify it.
    """
    prefix = Path(prefix)
    index_path = _index_path(prefix)
    num_shards, entries = read_entries(prefix)
    if names is None:
        names = sorted(entries)
    missing = [n for n in names if n not in entries]
    if missing:
        raise KeyError(f"{index_path}: no tensor named {missing[0]!r}")
    chosen = [entries[n] for n in names]
    shards: dict[int, np.ndarray] = {}
    for entry in chosen:  # check every size and bound before reading anything
        if entry.dtype is None:
            raise BundleError(f"{index_path}: tensor {entry.name!r} has type {entry.dtype_name}, which this reader does not support")
        if entry.sliced:
            raise BundleError(f"{index_path}: tensor {entry.name!r} is saved as partitioned slices, which this reader does not support")
        expected = int(np.prod(entry.shape, dtype=np.int64)) * entry.dtype.itemsize
        if entry.size != expected:
            raise BundleError(
                f"{index_path}: tensor {entry.name!r} records {entry.size} bytes, but {entry.dtype} {entry.shape} needs {expected}"
            )
        if entry.shard_id not in shards:
            shards[entry.shard_id] = _map_shard(_data_path(prefix, entry.shard_id, num_shards))
        if entry.offset < 0 or entry.offset + entry.size > shards[entry.shard_id].size:
            data_path = _data_path(prefix, entry.shard_id, num_shards)
            raise BundleError(
                f"{data_path}: tensor {entry.name!r} needs bytes {entry.offset}..{entry.offset + entry.size}, "
                f"but the file has {shards[entry.shard_id].size} (truncated data file?)"
            )
    bar = _progress(sum(e.size for e in chosen) if verify else 0, f"reading {prefix.name}")
    out: dict[str, np.ndarray] = {}
    for entry in chosen:
        raw = shards[entry.shard_id][entry.offset : entry.offset + entry.size]
        if verify:
            actual = crc32c(raw)
            if actual != unmask_crc(entry.crc32c):
                data_path = _data_path(prefix, entry.shard_id, num_shards)
                raise BundleError(
                    f"{data_path}: checksum mismatch for tensor {entry.name!r} "
                    f"(stored {unmask_crc(entry.crc32c):#010x}, computed {actual:#010x}): the file is corrupted"
                )
            if bar is not None:
                bar.update(entry.size)
        array = np.frombuffer(raw, dtype=entry.dtype.newbyteorder("<"), count=raw.size // entry.dtype.itemsize)
        out[entry.name] = array.reshape(entry.shape)
    if bar is not None:
        bar.close()
    return out


def write_checkpoint_file(directory: str | os.PathLike, prefix_name: str) -> None:
    """The `checkpoint` text file (CheckpointState) naming `prefix_name`, relative to `directory`."""
    quoted = prefix_name.replace("\\", "\\\\").replace('"', '\\"')
    text = f'model_checkpoint_path: "{quoted}"\nall_model_checkpoint_paths: "{quoted}"\n'
    atomic_write_bytes(Path(directory) / "checkpoint", text.encode())


def write_bundle(
    prefix: str | os.PathLike,
    tensors: Mapping[str, Any],
    *,
    block_size: int = 262144,
    checkpoint_file: bool = True,
) -> None:
    """Write `tensors` as a single-shard V2 checkpoint that TensorFlow reads.

    Produces `prefix.index`, `prefix.data-00000-of-00001` and (unless `checkpoint_file` is
    False) the `checkpoint` file beside them. `block_size` is the index table's block size
    (TensorFlow's default; smaller values give multi-block tables).
    """
    prefix = Path(prefix)
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{prefix}: tensor names must be non-empty strings, got {name!r}")
        array = np.asarray(value)
        if array.dtype.newbyteorder("=") not in _NUMPY_TO_TF:
            raise ValueError(f"{prefix}: tensor {name!r} has dtype {array.dtype}, which the TF bundle writer does not support")
        # (not np.ascontiguousarray: it turns scalars into shape [1])
        arrays[name] = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
    data_path = _data_path(prefix, 0, 1)
    # TensorFlow orders the table (and the data file) by the tensor names' bytes.
    keys = sorted(arrays, key=lambda n: n.encode("utf-8"))
    entries = [(b"", _HEADER)]
    offset = 0
    with atomic_file(data_path) as tmp_data, open(tmp_data, "wb") as f:
        for name in keys:
            array = arrays[name]
            raw = array.reshape(-1).view(np.uint8)
            f.write(memoryview(raw))
            tf_dtype = _NUMPY_TO_TF[array.dtype.newbyteorder("=")]
            entries.append((name.encode("utf-8"), _encode_entry(tf_dtype, array.shape, offset, raw.size, crc32c(raw))))
            offset += raw.size
    atomic_write_bytes(_index_path(prefix), build_table(entries, block_size))
    if checkpoint_file:
        write_checkpoint_file(prefix.parent, prefix.name)


def resolve_prefix(path: str | os.PathLike) -> Path:
    """The checkpoint prefix for a directory (via its `checkpoint` file, else `model.ckpt`,
    else its only `*.index` file) or for a prefix / `.index` / `.data-*` path."""
    path = Path(path)
    if not path.is_dir():
        name = re.sub(r"\.(index|data-\d{5}-of-\d{5})$", "", path.name)
        prefix = path.with_name(name)
        if not _index_path(prefix).is_file():
            raise FileNotFoundError(f"{_index_path(prefix)}: checkpoint index file not found")
        return prefix
    state = path / "checkpoint"
    if state.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', state.read_text(errors="replace"), re.M)
        if match:
            recorded = Path(match.group(1).replace('\\"', '"').replace("\\\\", "\\"))
            # Relative paths are relative to the directory; an absolute one from another
            # machine is tried by its base name here.
            for candidate in (path / recorded, path / recorded.name):
                if _index_path(candidate).is_file():
                    return candidate
    if _index_path(path / "model.ckpt").is_file():
        return path / "model.ckpt"
    indexes = sorted(path.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    if not indexes:
        raise FileNotFoundError(f"{path}: no TensorFlow checkpoint (model.ckpt.index) found")
    raise BundleError(f"{path}: several checkpoints ({', '.join(p.name for p in indexes)}) and no `checkpoint` file naming one")
