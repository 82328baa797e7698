"""TensorFlow's tensor-bundle format (V2 checkpoints), read and written without TensorFlow.

A checkpoint with prefix `P` is two kinds of file:

* `P.index`: a LevelDB-style table (SSTable). Key "" holds a `BundleHeaderProto`
  (num_shards, endianness, version); every other key is a tensor name whose value is a
  `BundleEntryProto` (dtype, shape, shard_id, offset, size, masked CRC32C of the bytes).
* `P.data-0000S-of-0000N`: the raw little-endian tensor bytes, at the offsets above.

The protobufs are decoded with a small wire-format parser here (no protobuf dependency),
and every block and tensor checksum is verified: CRC32C in pure NumPy (about 200-350 MB/s
on one core), or Google's C `google_crc32c` when it happens to be installed (optional).
Data files are memory-mapped, so a 6 GB checkpoint is never read into memory twice.

This module depends only on NumPy (and ml_dtypes for bfloat16), so that
`scripts/make_tf_fixtures.py` can load it by path inside a TensorFlow environment.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

try:  # ships with jax and tensorflow; needed only for bfloat16 tensors
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

try:
    from ..fileio import atomic_file, atomic_write_bytes
except ImportError:  # loaded by path without its package (scripts/make_tf_fixtures.py, no jax)
    import importlib.util
    import sys

    _spec = importlib.util.spec_from_file_location("jaxft_fileio", Path(__file__).resolve().parents[1] / "fileio.py")
    _fileio = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _fileio
    _spec.loader.exec_module(_fileio)  # stdlib only
    atomic_file, atomic_write_bytes = _fileio.atomic_file, _fileio.atomic_write_bytes

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


class BundleError(ValueError):
    """A tensor bundle that cannot be read: the message names the file (and tensor)."""


# --------------------------------------------------------------------------------------
# CRC32C (Castagnoli), as TensorFlow and LevelDB use it
# --------------------------------------------------------------------------------------

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_MASK_DELTA = 0xA282EAD8


def _byte_tables() -> np.ndarray:
    """T[k][b]: CRC register contribution of byte b followed by k zero bytes (k = 0..3)."""
    t = np.zeros((4, 256), dtype=np.uint32)
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ (_POLY if c & 1 else 0)
        t[0, b] = c
    for k in range(1, 4):
        t[k] = (t[k - 1] >> 8) ^ t[0][t[k - 1] & 0xFF]
    return t


_T = _byte_tables()
_T0 = [int(x) for x in _T[0]]
# Slicing by 4 bytes with 16-bit tables: two gathers per 32-bit word (fewest NumPy ops).
_LO16 = _T[3][np.arange(65536) & 0xFF] ^ _T[2][np.arange(65536) >> 8]
_HI16 = _T[1][np.arange(65536) & 0xFF] ^ _T[0][np.arange(65536) >> 8]


def _raw_scalar(reg: int, data: Any) -> int:
    for b in bytes(data):
        reg = _T0[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


# The register update is linear over GF(2): running n zero bytes through it is a 32x32 bit
# matrix Z_n, kept as its 32 columns. raw(r, A + B) = Z_|B|(raw(r, A)) ^ raw(0, B) lets
# independent lanes be computed side by side and combined.
def _op_apply(cols: list[int], x: int) -> int:
    out, i = 0, 0
    while x:
        if x & 1:
            out ^= cols[i]
        x >>= 1
        i += 1
    return out


_ZPOW: list[list[int]] = [[_raw_scalar(1 << i, b"\0") for i in range(32)]]  # Z_{2^k}


def _zero_op(n: int) -> list[int]:
    """Columns of Z_n."""
    cols = [1 << i for i in range(32)]
    k = 0
    while n:
        while len(_ZPOW) <= k:
            _ZPOW.append([_op_apply(_ZPOW[-1], c) for c in _ZPOW[-1]])
        if n & 1:
            cols = [_op_apply(_ZPOW[k], c) for c in cols]
        n >>= 1
        k += 1
    return cols


def _shift(reg: int, n: int) -> int:
    return _op_apply(_zero_op(n), reg) if n else reg


_OP_TABLES: dict[int, np.ndarray] = {}


def _op_tables(n: int) -> np.ndarray:
    """Z_n as four byte lookup tables, [4, 256] (one per byte of the register)."""
    if n not in _OP_TABLES:
        cols = np.array(_zero_op(n), dtype=np.uint32).reshape(4, 8)
        values = np.arange(256, dtype=np.uint32)
        tables = np.zeros((4, 256), np.uint32)
        for bit in range(8):
            on = ((values >> bit) & 1).astype(bool)
            tables[:, on] ^= cols[:, bit : bit + 1]
        _OP_TABLES[n] = tables
    return _OP_TABLES[n]


def _apply_op(n: int, v: np.ndarray) -> np.ndarray:
    """Z_n applied to every register in `v`."""
    t = _op_tables(n)
    return t[0][v & 0xFF] ^ t[1][(v >> 8) & 0xFF] ^ t[2][(v >> 16) & 0xFF] ^ t[3][v >> 24]


_CHUNK = 1 << 24  # bytes per NumPy pass (bounds the transposed copy below)
_MAX_LANES = 1 << 14  # registers updated per NumPy op: enough to hide the per-call overhead


def _raw_lanes(data: np.ndarray) -> int:
    """raw CRC register (start 0, no final xor) of a uint8 array, using parallel lanes."""
    n = data.size
    lane = 64
    while lane < 1024 and n // lane > _MAX_LANES:
        lane *= 2
    k = n // lane
    reg = 0
    if k >= 2:
        # words[c] holds word c of every lane: one contiguous row per step.
        words = np.ascontiguousarray(data[: k * lane].view("<u4").reshape(k, lane // 4).T)
        regs = np.zeros(k, np.uint32)
        lo_idx = np.empty(k, np.intp)
        hi_idx = np.empty(k, np.intp)
        tmp = np.empty(k, np.uint32)
        for row in words:
            regs ^= row
            np.bitwise_and(regs, 0xFFFF, out=lo_idx, casting="unsafe")
            np.right_shift(regs, 16, out=hi_idx, casting="unsafe")
            np.take(_LO16, lo_idx, out=tmp)
            np.take(_HI16, hi_idx, out=regs)
            regs ^= tmp
        # Pairwise combine: left lane shifted past the right lane's bytes. An odd count gets
        # a leading zero lane, which changes nothing (zeros from state 0 stay 0).
        span = lane
        while regs.size > 1:
            if regs.size & 1:
                regs = np.concatenate([np.zeros(1, np.uint32), regs])
            regs = _apply_op(span, regs[0::2]) ^ regs[1::2]
            span *= 2
        reg = int(regs[0])
    else:
        k = 0
    return _raw_scalar(reg, data[k * lane :])


def _crc32c_numpy(data: np.ndarray, crc: int) -> int:
    reg = crc ^ 0xFFFFFFFF
    for start in range(0, data.size, _CHUNK):
        chunk = data[start : start + _CHUNK]
        reg = _shift(reg, chunk.size) ^ _raw_lanes(chunk)
    return reg ^ 0xFFFFFFFF


def _find_fast_crc32c():
    """Google's C implementation when installed (optional): (name, extend(crc, buffer) -> int)."""
    try:
        import google_crc32c

        if google_crc32c.implementation == "c":
            return "google_crc32c", lambda crc, buf: google_crc32c.extend(crc, buf)
    except (ImportError, AttributeError):
        pass
    return "numpy", None


CRC32C_BACKEND, _FAST_EXTEND = _find_fast_crc32c()


def crc32c(data: Any, crc: int = 0, *, backend: str | None = None) -> int:
    """CRC32C of `data` (bytes-like or an array, read as raw bytes), extending `crc`.

    backend: None picks the fastest available ("numpy" is always available).
    """
    array = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    array = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    if backend is None:
        backend = CRC32C_BACKEND
    if backend != "numpy":
        if backend != CRC32C_BACKEND:
            raise ValueError(f"CRC32C backend {backend!r} is not available (have {CRC32C_BACKEND!r}, 'numpy')")
        for start in range(0, array.size, _CHUNK):  # the C API takes bytes: copy a chunk at a time
            crc = _FAST_EXTEND(crc, array[start : start + _CHUNK].tobytes())
        return crc & 0xFFFFFFFF
    return _crc32c_numpy(array, crc)


def mask_crc(crc: int) -> int:
    """LevelDB/TensorFlow store CRCs rotated and offset ("masked")."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# Protobuf wire format (just what BundleHeaderProto / BundleEntryProto need)
# --------------------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise BundleError(f"{where}: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise BundleError(f"{where}: varint too long")


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_message(buf: bytes, where: str) -> dict[int, list[Any]]:
    """field number -> values (int for varint/fixed, bytes for length-delimited)."""
    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos, where)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, where)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise BundleError(f"{where}: truncated fixed64 field")
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos, where)
            if pos + length > len(buf):
                raise BundleError(f"{where}: truncated length-delimited field")
            value = bytes(buf[pos : pos + length])
            pos += length
        elif wire == 5:
            if pos + 4 > len(buf):
                raise BundleError(f"{where}: truncated fixed32 field")
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise BundleError(f"{where}: unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _last(fields: dict[int, list[Any]], number: int, default: Any = 0) -> Any:
    values = fields.get(number)
    return values[-1] if values else default  # protobuf: the last occurrence wins


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""  # proto3 omits defaults


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _field_fixed32(number: int, value: int) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<I", value) if value else b""


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
    fields = _parse_message(value, where)
    tf_dtype = _last(fields, 1)
    shape_fields = _parse_message(_last(fields, 2, b""), where)
    if _last(shape_fields, 3):
        raise BundleError(f"{where}: tensor {name!r} has an unknown rank")
    shape = tuple(_signed64(_last(_parse_message(dim, where), 1)) for dim in shape_fields.get(2, []))
    if any(d < 0 for d in shape):
        raise BundleError(f"{where}: tensor {name!r} has an unknown dimension in shape {shape}")
    dtype = _TF_TO_NUMPY.get(tf_dtype)
    return TensorEntry(
        name=name,
        tf_dtype=tf_dtype,
        dtype=np.dtype(dtype) if dtype is not None else None,
        shape=shape,
        shard_id=_last(fields, 3),
        offset=_signed64(_last(fields, 4)),
        size=_signed64(_last(fields, 5)),
        crc32c=_last(fields, 6),
        sliced=bool(fields.get(7)),
    )


def _encode_entry(dtype: int, shape: tuple[int, ...], offset: int, size: int, crc: int) -> bytes:
    dims = b"".join(_field_bytes(2, _field_varint(1, d)) for d in shape)
    return (
        _field_varint(1, dtype)
        + _field_bytes(2, dims)
        + _field_varint(4, offset)
        + _field_varint(5, size)
        + _field_fixed32(6, mask_crc(crc))
    )


_BUNDLE_VERSION = 1  # TensorFlow's kTensorBundleVersion
_HEADER = _field_varint(1, 1) + _field_bytes(3, _field_varint(1, _BUNDLE_VERSION))  # 1 shard, little-endian


# --------------------------------------------------------------------------------------
# The index table (LevelDB SSTable layout)
# --------------------------------------------------------------------------------------

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
_TRAILER_SIZE = 5  # compression type byte + masked CRC32C


def _read_handle(buf: bytes, pos: int, where: str) -> tuple[tuple[int, int], int]:
    offset, pos = _read_varint(buf, pos, where)
    size, pos = _read_varint(buf, pos, where)
    return (offset, size), pos


def _read_block(table: bytes, handle: tuple[int, int], path: Path, what: str) -> bytes:
    offset, size = handle
    if offset + size + _TRAILER_SIZE > len(table):
        raise BundleError(f"{path}: {what} block at {offset}+{size} runs past the end of the file (truncated index?)")
    contents = table[offset : offset + size]
    kind = table[offset + size]
    stored = struct.unpack_from("<I", table, offset + size + 1)[0]
    if unmask_crc(stored) != crc32c(table[offset : offset + size + 1]):
        raise BundleError(f"{path}: checksum mismatch in {what} block at offset {offset} (corrupted index file)")
    if kind == 1:
        raise BundleError(f"{path}: {what} block is snappy-compressed, which this reader does not support")
    if kind != 0:
        raise BundleError(f"{path}: {what} block has unknown compression type {kind}")
    return contents


def _block_entries(block: bytes, path: Path, what: str) -> Iterator[tuple[bytes, bytes]]:
    where = f"{path}: {what} block"
    if len(block) < 4:
        raise BundleError(f"{where} is too short")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise BundleError(f"{where}: bad restart count {num_restarts}")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _read_varint(block, pos, where)
        unshared, pos = _read_varint(block, pos, where)
        value_len, pos = _read_varint(block, pos, where)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise BundleError(f"{where}: corrupted entry at offset {pos}")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _table_entries(path: Path) -> Iterator[tuple[bytes, bytes]]:
    try:
        table = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint index file not found") from None
    if len(table) < _FOOTER_SIZE:
        raise BundleError(f"{path}: too short ({len(table)} bytes) to be a TensorFlow checkpoint index")
    footer = table[-_FOOTER_SIZE:]
    magic = struct.unpack_from("<Q", footer, _FOOTER_SIZE - 8)[0]
    if magic != _TABLE_MAGIC:
        raise BundleError(f"{path}: bad magic number {magic:#018x} (not a TensorFlow checkpoint index)")
    _meta_handle, pos = _read_handle(footer, 0, f"{path}: footer")
    index_handle, _ = _read_handle(footer, pos, f"{path}: footer")
    index = _read_block(table, index_handle, path, "index")
    previous = None
    for _, handle_bytes in _block_entries(index, path, "index"):
        handle, _ = _read_handle(handle_bytes, 0, f"{path}: index block")
        for key, value in _block_entries(_read_block(table, handle, path, "data"), path, "data"):
            if previous is not None and key <= previous:
                raise BundleError(f"{path}: keys out of order at {key!r} (corrupted index file)")
            previous = key
            yield key, value


class _BlockBuilder:
    """A LevelDB block: prefix-compressed keys, a restart point every `interval` keys."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.buffer = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.counter = 0
        self.buffer += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        self.buffer += key[shared:] + value
        self.last_key = key
        self.counter += 1

    def size_estimate(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def empty(self) -> bool:
        return not self.buffer

    def finish(self) -> bytes:
        tail = b"".join(struct.pack("<I", r) for r in self.restarts) + struct.pack("<I", len(self.restarts))
        return bytes(self.buffer) + tail


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """LevelDB's bytewise comparator: a short key in [start, limit) for the index block."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def _build_table(entries: list[tuple[bytes, bytes]], block_size: int) -> bytes:
    """An uncompressed SSTable, laid out exactly as TensorFlow's table builder does."""
    out = bytearray()

    def write_block(block: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(block))
        trailer = b"\x00"  # no compression
        out.extend(block + trailer + struct.pack("<I", mask_crc(crc32c(block + trailer))))
        return handle

    data, index = _BlockBuilder(16), _BlockBuilder(1)
    pending_handle: bytes | None = None
    last_key = b""
    for key, value in entries:
        if pending_handle is not None:
            index.add(_shortest_separator(last_key, key), pending_handle)
            pending_handle = None
        data.add(key, value)
        last_key = key
        if data.size_estimate() >= block_size:
            pending_handle = write_block(data.finish())
            data = _BlockBuilder(16)
    if not data.empty():
        pending_handle = write_block(data.finish())
    meta_handle = write_block(_BlockBuilder(16).finish())
    if pending_handle is not None:
        index.add(_short_successor(last_key), pending_handle)
    index_handle = write_block(index.finish())
    footer = (meta_handle + index_handle).ljust(_FOOTER_SIZE - 8, b"\x00") + struct.pack("<Q", _TABLE_MAGIC)
    out.extend(footer)
    return bytes(out)


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
    for key, value in _table_entries(path):
        if key == b"":
            header = _parse_message(value, f"{path}: header")
            continue
        name = key.decode("utf-8", errors="replace")
        entries[name] = _parse_entry(name, value, f"{path}: entry {name!r}")
    if header is None:
        raise BundleError(f"{path}: no bundle header (not a V2 TensorFlow checkpoint index)")
    num_shards = _last(header, 1)
    if _last(header, 2) != 0:
        raise BundleError(f"{path}: big-endian checkpoints are not supported")
    version = _parse_message(_last(header, 3, b""), f"{path}: header")
    if _last(version, 3) > _BUNDLE_VERSION:
        raise BundleError(f"{path}: needs a reader of bundle version >= {_last(version, 3)} (this is {_BUNDLE_VERSION})")
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
    atomic_write_bytes(_index_path(prefix), _build_table(entries, block_size))
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
