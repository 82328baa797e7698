"""The index file of a TensorFlow tensor bundle: a LevelDB table (SSTable) of protobuf values.

The protobuf wire format here is just what BundleHeaderProto and BundleEntryProto need (no
protobuf dependency); the table is read with every block's CRC32C verified, and built
uncompressed, laid out exactly as TensorFlow's table builder does.

Depends only on NumPy (see jaxft.weights.tf_bundle).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Iterator

from .crc32c import crc32c, mask_crc, unmask_crc


class BundleError(ValueError):
    """A tensor bundle that cannot be read: the message names the file (and tensor)."""


# --------------------------------------------------------------------------------------
# Protobuf wire format
# --------------------------------------------------------------------------------------


def read_varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
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


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_message(buf: bytes, where: str) -> dict[int, list[Any]]:
    """field number -> values (int for varint/fixed, bytes for length-delimited)."""
    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = read_varint(buf, pos, where)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = read_varint(buf, pos, where)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise BundleError(f"{where}: truncated fixed64 field")
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = read_varint(buf, pos, where)
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


def last_field(fields: dict[int, list[Any]], number: int, default: Any = 0) -> Any:
    values = fields.get(number)
    return values[-1] if values else default  # protobuf: the last occurrence wins


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value) if value else b""  # proto3 omits defaults


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def field_fixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<I", value) if value else b""


# --------------------------------------------------------------------------------------
# The table (LevelDB SSTable layout)
# --------------------------------------------------------------------------------------

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
_TRAILER_SIZE = 5  # compression type byte + masked CRC32C


def _read_handle(buf: bytes, pos: int, where: str) -> tuple[tuple[int, int], int]:
    offset, pos = read_varint(buf, pos, where)
    size, pos = read_varint(buf, pos, where)
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
        shared, pos = read_varint(block, pos, where)
        unshared, pos = read_varint(block, pos, where)
        value_len, pos = read_varint(block, pos, where)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise BundleError(f"{where}: corrupted entry at offset {pos}")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def table_entries(path: Path) -> Iterator[tuple[bytes, bytes]]:
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
        self.buffer += varint(shared) + varint(len(key) - shared) + varint(len(value))
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


def build_table(entries: list[tuple[bytes, bytes]], block_size: int) -> bytes:
    """An uncompressed SSTable, laid out exactly as TensorFlow's table builder does."""
    out = bytearray()

    def write_block(block: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(block))
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
