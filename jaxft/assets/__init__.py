"""Files shipped inside the package: the GPT-2 vocabulary and the reference's two data sets.

README.md in this folder lists each file with its origin, licence and SHA-256; NOTICE holds
the attributions. Every read is checked against the expected hash, so a damaged install
fails loudly instead of tokenising or training on something else.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


class ChecksumError(ValueError):
    """A file's SHA-256 is not the expected one; the message is one line naming the file."""


def check_sha256(data: bytes, expected: str, source: str | Path) -> bytes:
    """`data` unchanged when its SHA-256 is `expected`, else a `ChecksumError` naming `source`."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ChecksumError(f"{source}: SHA-256 {actual} does not match the expected {expected.lower()}")
    return data


def asset_path(name: str) -> Path:
    """The path of a bundled file (`name` relative to this folder)."""
    path = ASSETS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: bundled file missing (a broken jaxft install?)")
    return path


def read_asset(name: str, sha256: str) -> bytes:
    """A bundled file's bytes, gunzipped when `name` ends in `.gz`, checked against `sha256`
    (the hash of the uncompressed bytes)."""
    path = asset_path(name)
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return check_sha256(data, sha256, path)
