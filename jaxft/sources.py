"""Where every file jaxft needs comes from: the one module that fetches over the network.

`gpt2_checkpoint` downloads OpenAI's checkpoint when it is not on disk. `sms_spam_file` and
`instruction_data_file` return the copies bundled in `jaxft/assets` by default; with
`download=True` they fetch the originals (primary URL, then backup) as the reference does.
Both data sets are checked against the SHA-256 of the files the reference used, so a
changed upstream file is reported instead of silently giving other splits. The transfer
itself (mirrors, resume, atomic rename) is `jaxft.download.fetch`.
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from jaxft.assets import ChecksumError, asset_path, check_sha256
from jaxft.config import OPENAI_SIZE_DIRS, canonical_name
from jaxft.download import download_gpt2, fetch
from jaxft.fileio import atomic_file

__all__ = [
    "INSTRUCTION_DATA_FILE",
    "INSTRUCTION_DATA_SHA256",
    "INSTRUCTION_DATA_URL",
    "SMS_SPAM_FILE",
    "SMS_SPAM_SHA256",
    "SMS_SPAM_URLS",
    "ChecksumError",
    "gpt2_checkpoint",
    "instruction_data_file",
    "sms_spam_file",
]

SMS_SPAM_URLS = (
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
)
SMS_SPAM_FILE = "SMSSpamCollection"
# The reference renames the extracted file to this; accept it where it already exists.
SMS_SPAM_FILE_REFERENCE = "SMSSpamCollection.tsv"
SMS_SPAM_ZIP = "sms_spam_collection.zip"
SMS_SPAM_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
SMS_SPAM_README_SHA256 = "656da9ff765ddeb69841ef429e3ad65f2207a9f410892a6f04f06542426fb75c"
SMS_SPAM_BYTES = 477_907  # the reference's SMSSpamCollection (the zip is smaller)
# The bound on what a download or its extraction may write: a few times the known size.
SMS_SPAM_MAX_BYTES = 4 * SMS_SPAM_BYTES

INSTRUCTION_DATA_FILE = "instruction-data.json"
INSTRUCTION_DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch"
    "/main/ch07/01_main-chapter-code/instruction-data.json"
)
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
INSTRUCTION_DATA_MAX_BYTES = 4 * 203_524  # a few times the reference's file

# Where the bundled copies sit inside jaxft/assets.
_BUNDLED_SMS_SPAM = f"sms_spam_collection/{SMS_SPAM_FILE}"
_BUNDLED_INSTRUCTION_DATA = INSTRUCTION_DATA_FILE


def _verified(path: Path, sha256: str | None) -> Path:
    """`path` once its SHA-256 is `sha256` (no check when None); else a one-line ChecksumError."""
    if sha256 is not None:
        check_sha256(path.read_bytes(), sha256, path)
    return path


def gpt2_checkpoint(
    size: str,
    models_dir: str | Path = "gpt2",
    *,
    progress: bool = True,
    base_urls: Sequence[str] | None = None,
    timeout: float = 60.0,
    verify: bool = False,
) -> Path:
    """OpenAI's checkpoint directory for `size` (`models_dir/<124M|355M|...>`), downloaded
    (every file, primary then backup root) when its `model.ckpt.index` is absent; with
    `verify`, every file is checked against the server (sizes, known hashes) and completed."""
    target = Path(models_dir) / OPENAI_SIZE_DIRS[canonical_name(size)]
    if not verify and (target / "model.ckpt.index").is_file():
        return target
    return download_gpt2(size, models_dir, base_urls=base_urls, timeout=timeout, progress=progress)


def sms_spam_file(
    *,
    download: bool = False,
    data_dir: str | Path = "sms_spam_collection",
    urls: Sequence[str] = SMS_SPAM_URLS,
    sha256: str | None = SMS_SPAM_SHA256,
    timeout: float = 60.0,
    progress: bool = True,
    max_bytes: int = SMS_SPAM_MAX_BYTES,
) -> Path:
    """The SMS Spam Collection file (`label<TAB>text` lines).

    download=False: the copy bundled in the package. download=True: UCI's zip, fetched from
    `urls` in order and extracted into `data_dir` (skipped when `SMSSpamCollection`, or the
    reference's `.tsv` name, is already there); only that member is extracted (not UCI's
    readme, which is bundled). `max_bytes` bounds both the download and the extracted file.
    Either way the file must have `sha256` (the reference's copy; None skips the check).
    """
    if not download:
        return _verified(asset_path(_BUNDLED_SMS_SPAM), sha256)
    data_dir = Path(data_dir)
    for name in (SMS_SPAM_FILE, SMS_SPAM_FILE_REFERENCE):
        if (data_dir / name).is_file():
            if progress:
                print(f"{data_dir / name} already exists. Skipping download and extraction.", file=sys.stderr)
            return _verified(data_dir / name, sha256)

    # fetch makes data_dir (and removes it again, when it made it, should every URL fail); it
    # raises DownloadError (naming every URL tried) when all of them fail.
    zip_path = fetch(list(urls), data_dir / SMS_SPAM_ZIP, desc="SMS Spam Collection", timeout=timeout, progress=progress,
                     max_bytes=max_bytes)
    extracted = data_dir / SMS_SPAM_FILE
    try:
        _extract_member(zip_path, SMS_SPAM_FILE, extracted, sha256, max_bytes)
    except ValueError:  # (ChecksumError too) a wrong archive: the next call downloads it again
        zip_path.unlink()
        raise
    zip_path.unlink()
    return extracted


def _extract_member(zip_path: Path, member: str, dest: Path, sha256: str | None, max_bytes: int) -> None:
    """Stream one member of a zip into `dest`, refusing more than `max_bytes` (a zip bomb: a
    small archive that inflates to gigabytes, whatever its header claims) and, before the
    rename, bytes without `sha256`. Nothing else of the archive is extracted. Atomic: `dest`
    is the skip marker, so a failure or a kill midway must leave none."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            if member not in archive.namelist():
                raise ValueError(f"{zip_path}: the archive has no {member} (members: {archive.namelist()})")
            declared = archive.getinfo(member).file_size
            if declared > max_bytes:  # refused before a byte is inflated
                raise ValueError(f"{zip_path}: {member} would inflate to {declared} bytes, more than the {max_bytes} allowed: refused")
            digest = hashlib.sha256()
            with archive.open(member) as source, atomic_file(dest) as tmp, open(tmp, "wb") as out:
                written = 0
                while block := source.read(min(1 << 20, max_bytes - written + 1)):  # never inflates much past the bound
                    written += len(block)
                    if written > max_bytes:  # (zipfile stops at the declared size; counted anyway: the bound is ours)
                        raise ValueError(f"{zip_path}: {member} inflates to more than the {max_bytes} bytes allowed: refused")
                    digest.update(block)
                    out.write(block)
                actual = digest.hexdigest()
                if sha256 is not None and actual != sha256.lower():  # never renamed into place: the next call downloads again
                    raise ChecksumError(f"{dest}: SHA-256 {actual} does not match the expected {sha256.lower()}")
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise ValueError(f"{zip_path}: not a valid zip file ({exc})") from None


def instruction_data_file(
    *,
    download: bool = False,
    data_dir: str | Path = ".",
    url: str | Sequence[str] = INSTRUCTION_DATA_URL,
    sha256: str | None = INSTRUCTION_DATA_SHA256,
    timeout: float = 60.0,
    progress: bool = True,
    max_bytes: int = INSTRUCTION_DATA_MAX_BYTES,
) -> Path:
    """The reference's `instruction-data.json` (1,100 Alpaca-style entries).

    download=False: the copy bundled in the package. download=True:
    `data_dir/instruction-data.json`, fetched from `url` (or the first working of several)
    when absent. Either way the file must have `sha256` (None skips the check); a download
    whose bytes do not match is not kept, and none longer than `max_bytes` is written.
    """
    if not download:
        return _verified(asset_path(_BUNDLED_INSTRUCTION_DATA), sha256)
    dest = Path(data_dir) / INSTRUCTION_DATA_FILE
    if dest.is_file():
        return _verified(dest, sha256)  # a file already there is the user's: report, never replace
    urls = [url] if isinstance(url, str) else list(url)
    # With a hash, fetch checks it before the rename and moves on to the next URL on a mismatch.
    return fetch(urls, dest, desc=dest.name, timeout=timeout, progress=progress, sha256=sha256, max_bytes=max_bytes)
