"""Where every file jaxft needs comes from: the one module that fetches over the network.

`gpt2_checkpoint` downloads OpenAI's checkpoint when it is not on disk. `sms_spam_file` and
`instruction_data_file` return the copies bundled in `jaxft/assets` by default; with
`download=True` they fetch the originals (primary URL, then backup) as the reference does.
Both data sets are checked against the SHA-256 of the files the reference used, so a
changed upstream file is reported instead of silently giving other splits. The transfer
itself (mirrors, resume, atomic rename) is `jaxft.download.fetch`.
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from jaxft.assets import ChecksumError, asset_path, check_sha256
from jaxft.config import OPENAI_SIZE_DIRS, canonical_name
from jaxft.download import download_gpt2, fetch
from jaxft.fileio import atomic_write_bytes

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

INSTRUCTION_DATA_FILE = "instruction-data.json"
INSTRUCTION_DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch"
    "/main/ch07/01_main-chapter-code/instruction-data.json"
)
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"

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
) -> Path:
    """The SMS Spam Collection file (`label<TAB>text` lines).

    download=False: the copy bundled in the package. download=True: UCI's zip, fetched from
    `urls` in order and extracted into `data_dir` (skipped when `SMSSpamCollection`, or the
    reference's `.tsv` name, is already there). Either way the file must have `sha256`
    (the reference's copy; None skips the check).
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
    zip_path = fetch(list(urls), data_dir / SMS_SPAM_ZIP, desc="SMS Spam Collection", timeout=timeout, progress=progress)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            if SMS_SPAM_FILE not in archive.namelist():
                raise ValueError(f"{zip_path}: the archive has no {SMS_SPAM_FILE} (members: {archive.namelist()})")
            data = archive.read(SMS_SPAM_FILE)
            # The rest (UCI's readme) as the reference extracts it; extractall sanitises member
            # names, so a hostile zip cannot write outside data_dir.
            archive.extractall(data_dir, members=[name for name in archive.namelist() if name != SMS_SPAM_FILE])
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{zip_path}: not a valid zip file ({exc})") from None
    extracted = data_dir / SMS_SPAM_FILE
    if sha256 is not None:
        check_sha256(data, sha256, extracted)  # a wrong file is never written: the next call downloads again
    # Atomic: the extracted file is the skip marker, so a run killed mid-write must leave none.
    atomic_write_bytes(extracted, data)
    zip_path.unlink()
    return extracted


def instruction_data_file(
    *,
    download: bool = False,
    data_dir: str | Path = ".",
    url: str | Sequence[str] = INSTRUCTION_DATA_URL,
    sha256: str | None = INSTRUCTION_DATA_SHA256,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """The reference's `instruction-data.json` (1,100 Alpaca-style entries).

    download=False: the copy bundled in the package. download=True:
    `data_dir/instruction-data.json`, fetched from `url` (or the first working of several)
    when absent. Either way the file must have `sha256` (None skips the check); a download
    whose bytes do not match is not kept.
    """
    if not download:
        return _verified(asset_path(_BUNDLED_INSTRUCTION_DATA), sha256)
    dest = Path(data_dir) / INSTRUCTION_DATA_FILE
    if dest.is_file():
        return _verified(dest, sha256)  # a file already there is the user's: report, never replace
    urls = [url] if isinstance(url, str) else list(url)
    # With a hash, fetch checks it before the rename and moves on to the next URL on a mismatch.
    return fetch(urls, dest, desc=dest.name, timeout=timeout, progress=progress, sha256=sha256)
