"""Download files over HTTP(S) with mirrors, resume and verification; the OpenAI GPT-2 checkpoints.

The machinery only: what to fetch and when is decided in `jaxft.sources`, the one module the
rest of jaxft calls for anything that may come from the network.

`fetch` never leaves a file that looks complete but is not: it streams into `<dest>.part`,
checks the byte count against Content-Length (and a SHA-256 when one is known), and only then
renames the part file onto `dest`. An interrupted download leaves the `.part` file behind and
the next run resumes it with an HTTP Range request when the server allows it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from jaxft.config import OPENAI_SIZE_DIRS, canonical_name, from_hparams, get_config
from jaxft.tokenizer import (
    ENCODER_JSON,
    ENCODER_JSON_SHA256,
    VOCAB_BPE,
    VOCAB_BPE_SHA256,
)

if TYPE_CHECKING:  # (imported where a download starts: importing jaxft stays light)
    from tqdm import tqdm

# Roots of the OpenAI checkpoint directories; a file's URL is `{root}/{124M|...}/{file}`.
PRIMARY_ROOT = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BACKUP_ROOT = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
DEFAULT_ROOTS = (PRIMARY_ROOT, BACKUP_ROOT)

GPT2_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)

CHUNK_BYTES = 1 << 20
USER_AGENT = "jaxft-downloader/0.1"

class DownloadError(OSError):
    """Every URL for one file failed; `failures` holds the (url, reason) pairs in the order tried."""

    def __init__(self, message: str, failures: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.failures = list(failures)

    def __str__(self) -> str:
        return self.args[0]


class _UrlFailure(Exception):
    """One URL failed; the caller moves on to the next one."""


class _TooBig(_UrlFailure):
    """A body longer than the bound `fetch` was given."""


def partial_path(dest: str | Path) -> Path:
    """Where `fetch` streams `dest` before renaming it: `<dest>.part`."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _open(url: str, timeout: float, headers: dict[str, str] | None = None, method: str = "GET"):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})}, method=method)
    return urllib.request.urlopen(request, timeout=timeout)


def _describe(exc: BaseException, timeout: float) -> str:
    """A short reason for one failed URL, for the final error message."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        if not isinstance(exc.reason, BaseException):
            return str(exc.reason)
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed early ({len(exc.partial)} bytes in the last read)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _content_length(headers) -> int | None:
    value = headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)")


def _remote_size(urls: Sequence[str], timeout: float) -> int | None:
    """The file's size according to the first URL that answers a HEAD request, else None."""
    for url in urls:
        try:
            with _open(url, timeout, method="HEAD") as response:
                size = _content_length(response.headers)
        except (OSError, http.client.HTTPException):
            continue
        if size is not None:
            return size
    return None


def _is_complete(dest: Path, urls: Sequence[str], timeout: float, sha256: str | None) -> bool:
    """Whether an existing `dest` can be kept.

    With a known hash the check is local (no request). Otherwise the size is compared with
    the server's Content-Length; when no server answers (offline), the file is kept: `fetch`
    only ever creates `dest` by renaming a verified part file.
    """
    if sha256 is not None:
        return sha256_of(dest) == sha256.lower()
    size = _remote_size(urls, timeout)
    return size is None or size == dest.stat().st_size


def _too_big(max_bytes: int) -> str:
    return f"more than {max_bytes} bytes, far more than the file should have: refused"


def _copy(response, fh, bar: tqdm, timeout: float, room: int | None = None) -> int:
    """Stream the body into `fh`, at most `room` bytes (None: no bound); network errors and a
    longer body become `_UrlFailure`, disk errors propagate."""
    received = 0
    while True:
        try:
            chunk = response.read(CHUNK_BYTES if room is None else min(CHUNK_BYTES, room - received + 1))
        except (OSError, http.client.HTTPException) as exc:
            raise _UrlFailure(f"{_describe(exc, timeout)} after {received} bytes") from None
        if not chunk:
            return received
        if room is not None and received + len(chunk) > room:
            raise _TooBig()
        fh.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))


def _download_one(url: str, part: Path, label: str, timeout: float, progress: bool, max_bytes: int | None = None) -> None:
    """Bring `part` to the full body of `url`, resuming it when the server honours Range; a
    body (or a file) longer than `max_bytes` is refused and its part file removed."""
    offset = part.stat().st_size if part.is_file() else 0
    try:
        response = _open(url, timeout, {"Range": f"bytes={offset}-"} if offset else None)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Nothing left to send: the part file is either complete or not this file at all.
            match = _UNSATISFIED.search(exc.headers.get("Content-Range", "") or "")
            exc.close()
            if match and int(match.group(1)) == offset:
                return
            part.unlink()
            return _download_one(url, part, label, timeout, progress, max_bytes)
        exc.close()
        raise _UrlFailure(_describe(exc, timeout)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _UrlFailure(_describe(exc, timeout)) from None

    with response:
        length = _content_length(response.headers)
        if response.status == 206:
            match = _RANGE.search(response.headers.get("Content-Range", "") or "")
            if not match or int(match.group(1)) != offset:
                part.unlink()
                got = response.headers.get("Content-Range")
                raise _UrlFailure(f"bad Content-Range {got!r} for a resume at byte {offset}")
            total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
        else:
            # A plain 200 (fresh download, or a server that ignores Range): start over.
            offset, total, mode = 0, length, "wb"
        if max_bytes is not None and (offset > max_bytes or (total or 0) > max_bytes or offset + (length or 0) > max_bytes):
            part.unlink(missing_ok=True)  # announced too big: not one byte is read
            raise _UrlFailure(_too_big(max_bytes))
        from tqdm import tqdm  # here: importing jaxft stays light

        try:
            with open(part, mode) as fh, tqdm(
                total=total,
                initial=offset,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
            ) as bar:
                received = _copy(response, fh, bar, timeout, None if max_bytes is None else max_bytes - offset)
        except _TooBig:
            part.unlink()  # nothing of it is worth resuming
            raise _UrlFailure(_too_big(max_bytes)) from None
    if length is not None and received != length:
        raise _UrlFailure(f"short body: got {received} of {length} bytes")
    if total is not None and part.stat().st_size != total:
        raise _UrlFailure(f"size mismatch: {part.stat().st_size} bytes on disk, server says {total}")


def fetch(
    urls: Sequence[str] | str,
    dest: str | Path,
    *,
    desc: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    sha256: str | None = None,
    max_bytes: int | None = None,
) -> Path:
    """Download the first URL of `urls` that works to `dest`; return `dest`.

    `max_bytes` bounds what a (hostile or broken) server can make it write: a body announced
    or found longer is refused, its part file removed, and the next URL tried.

    Skips an existing `dest` that is complete (see `_is_complete`). Streams into
    `<dest>.part` (resumed with a Range request when one is left over) and renames it only
    after the byte count matches Content-Length and, when `sha256` is given, the hash matches.
    Raises `DownloadError` naming every URL tried and why it failed.
    """
    dest = Path(dest)
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError(f"no URL given for {dest}")
    label = desc or dest.name
    if dest.is_file() and _is_complete(dest, urls, timeout, sha256):
        if progress:
            print(f"{label}: already complete, skipped", file=sys.stderr)
        return dest
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # deepest first
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest)
    failures: list[tuple[str, str]] = []
    for url in urls:
        try:
            _download_one(url, part, label, timeout, progress, max_bytes)
            if sha256 is not None:
                actual = sha256_of(part)
                if actual != sha256.lower():
                    part.unlink()  # resuming a wrong body would only stay wrong
                    raise _UrlFailure(f"SHA-256 {actual} does not match the expected {sha256.lower()}")
        except _UrlFailure as exc:
            failures.append((url, str(exc)))
            continue
        os.replace(part, dest)
        return dest
    for directory in created:  # made for this file and left empty (a .part to resume keeps its own)
        with contextlib.suppress(OSError):
            directory.rmdir()
    tried = "; ".join(f"{url} ({reason})" for url, reason in failures)
    raise DownloadError(f"could not download {dest}: tried {len(failures)} URL(s): {tried}", failures)


def _size_dir(size: str) -> str:
    return OPENAI_SIZE_DIRS[canonical_name(size)]


def checkpoint_urls(size: str, base_urls: Sequence[str] | None = None) -> list[tuple[str, list[str]]]:
    """(file name, [url per root]) for the OpenAI checkpoint of `size`, primary root first."""
    size_dir = _size_dir(size)
    roots = [root.rstrip("/") for root in (base_urls or DEFAULT_ROOTS)]
    return [(name, [f"{root}/{size_dir}/{name}" for root in roots]) for name in GPT2_FILES]


def _known_hashes() -> dict[str, str]:
    # The vocabulary files are the same for every size, and their hashes are published.
    return {ENCODER_JSON: ENCODER_JSON_SHA256, VOCAB_BPE: VOCAB_BPE_SHA256}


def check_hparams(checkpoint_dir: str | Path, size: str) -> None:
    """Raise ValueError when `hparams.json` does not parse or does not describe `size`."""
    path = Path(checkpoint_dir) / "hparams.json"
    found = from_hparams(path).to_hparams()
    expected = get_config(size).to_hparams()
    if found != expected:
        diff = ", ".join(f"{k}={found[k]} (expected {expected[k]})" for k in expected if found[k] != expected[k])
        raise ValueError(f"{path}: does not describe {canonical_name(size)}: {diff}")


def download_gpt2(
    size: str,
    models_dir: str | Path = "gpt2",
    *,
    base_urls: Sequence[str] | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    verify_vocab: bool = True,
) -> Path:
    """Download the 7 OpenAI checkpoint files of `size` into `models_dir/<124M|...>/`.

    `base_urls` replaces the primary and backup roots. `verify_vocab` checks
    `encoder.json` / `vocab.bpe` against GPT-2's published SHA-256. Returns the directory.
    """
    target = Path(models_dir) / _size_dir(size)
    hashes = _known_hashes() if verify_vocab else {}
    for name, urls in checkpoint_urls(size, base_urls):
        fetch(
            urls,
            target / name,
            desc=f"{target.name}/{name}",
            timeout=timeout,
            progress=progress,
            sha256=hashes.get(name),
        )
    check_hparams(target, size)
    return target
