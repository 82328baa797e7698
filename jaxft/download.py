"""Downloads: the OpenAI GPT-2 checkpoints (and any file) from a primary URL with backups.

A file is streamed to `NAME.part` with a progress bar, checked against Content-Length and
only then renamed, so an interrupted download never leaves a file that looks complete;
a later run resumes the `.part` file with an HTTP Range request when the server allows it.
"""

from __future__ import annotations

import argparse
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from .config import OPENAI_SIZE_DIRS, canonical_name, from_hparams, get_config

PRIMARY_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BACKUP_BASE = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
GPT2_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """Every URL failed; the message lists each one and why."""


def _remote_size(url: str, timeout: float) -> int | None:
    """Content-Length from a HEAD request, or None when the server does not say."""
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _stream(url: str, dest: Path, desc: str, timeout: float, progress: bool) -> None:
    """Download `url` into `dest` via `dest.part`, resuming a leftover .part when possible."""
    from tqdm.auto import tqdm

    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part is not a prefix we can resume from: restart
            part.unlink()
            return _stream(url, dest, desc, timeout, progress)
        raise
    with response:
        if offset and response.status != 206:  # the server ignored the Range: start over
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        mode = "ab" if offset else "wb"
        with open(part, mode) as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress
        ) as bar:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
    received = part.stat().st_size
    if total is not None and received != total:
        # Keep the .part: the next attempt resumes it.
        raise DownloadError(f"{url}: received {received} of {total} bytes (connection closed early)")
    os.replace(part, dest)


def fetch(
    urls: Sequence[str] | str,
    dest: str | Path,
    *,
    desc: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download `dest` from the first URL that works (primary first, then backups).

    Skips the download when `dest` exists with the size the server reports (or when the
    server cannot be asked and the file exists); re-downloads on a size mismatch.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("fetch: no URL given")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    desc = desc or dest.name
    failures: list[str] = []
    for url in urls:
        try:
            try:
                expected = _remote_size(url, timeout)
            except urllib.error.HTTPError as exc:
                if exc.code not in (403, 405, 501):  # servers that refuse HEAD but serve GET
                    raise
                expected = None
            if dest.exists():
                if expected is None or dest.stat().st_size == expected:
                    if progress:
                        print(f"{dest} already exists and is complete; skipping")
                    return dest
                dest.unlink()  # wrong size: an old or foreign file
            _stream(url, dest, desc, timeout, progress)
            if expected is not None and dest.stat().st_size != expected:
                size = dest.stat().st_size
                dest.unlink()
                raise DownloadError(f"{url}: downloaded {size} bytes, but the server announced {expected}")
            return dest
        except (urllib.error.URLError, OSError, DownloadError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError) else exc
            failures.append(f"{url}: {reason}")
    if dest.exists():  # offline, but a previous run completed the file
        return dest
    raise DownloadError(f"could not download {dest.name}:\n  " + "\n  ".join(failures))


def checkpoint_urls(size: str, base_urls: Sequence[str] | None = None) -> list[tuple[str, list[str]]]:
    """(file name, [primary URL, backup URL, ...]) for each file of an OpenAI GPT-2 checkpoint."""
    size_dir = OPENAI_SIZE_DIRS[canonical_name(size)]
    bases = list(base_urls) if base_urls else [PRIMARY_BASE, BACKUP_BASE]
    return [(name, [f"{base.rstrip('/')}/{size_dir}/{name}" for base in bases]) for name in GPT2_FILES]


def download_gpt2(
    size: str,
    models_dir: str | Path = "gpt2",
    *,
    base_urls: Sequence[str] | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download all seven files of an OpenAI GPT-2 checkpoint into `models_dir/<124M|...>/`."""
    canonical = canonical_name(size)
    ckpt_dir = Path(models_dir) / OPENAI_SIZE_DIRS[canonical]
    for name, urls in checkpoint_urls(canonical, base_urls):
        fetch(urls, ckpt_dir / name, desc=name, timeout=timeout, progress=progress)
    found = from_hparams(ckpt_dir / "hparams.json")
    expected = get_config(canonical)
    for field in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
        if getattr(found, field) != getattr(expected, field):
            raise DownloadError(
                f"{ckpt_dir / 'hparams.json'}: {field}={getattr(found, field)}, but {canonical} has {getattr(expected, field)}"
            )
    return ckpt_dir


def _download_command(args: argparse.Namespace) -> int:
    try:
        path = download_gpt2(args.size, args.dir, base_urls=args.base_url or None, timeout=args.timeout)
    except DownloadError as exc:
        from .cli import CLIError

        raise CLIError(str(exc).replace("\n", " ")) from None
    print(f"GPT-2 {canonical_name(args.size)} is in {path}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("download", help="download an OpenAI GPT-2 checkpoint (124M, 355M, 774M, 1558M)")
    p.add_argument("size", help="124M | 355M | 774M | 1558M, or gpt2-small / gpt2-medium / ...")
    p.add_argument("--dir", default="gpt2", help="models directory; files go to DIR/<size>/")
    p.add_argument("--base-url", action="append", help="URL root to try instead of the defaults (repeatable; tried in order)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per connection attempt")
    p.set_defaults(func=_download_command)
