"""jaxft.sources: the bundled assets (hashes, same rows as ../shared/data, no network) and the
downloads behind `download=True`, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import socket
import tomllib
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from jaxft import assets, sources
from jaxft import tokenizer as tk
from jaxft.data import instruct, spam
from jaxft.download import GPT2_FILES, DownloadError

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_HPARAMS = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
FAKE_COLLECTION = b"ham\thello\nspam\tWIN now\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# ----------------------------------------------------------------------------- the bundled assets


BUNDLED = {  # bundled file -> how SOURCES.md names the original
    "instruction-data.json": "instruction-data.json",
    "instruction-data-with-preference.json": "instruction-data-with-preference.json",
    "sms_spam_collection/SMSSpamCollection": "sms_spam_collection/SMSSpamCollection",
    "sms_spam_collection/readme": "sms_spam_collection/readme",
    "gpt2_vocab/encoder.json.gz": "gpt2_vocab/encoder.json",
    "gpt2_vocab/vocab.bpe.gz": "gpt2_vocab/vocab.bpe",
}


def test_bundled_files_have_the_hashes_of_sources_md(shared_data):
    table = (shared_data / "SOURCES.md").read_text(encoding="utf-8").splitlines()
    for name, original in BUNDLED.items():
        row = next(line for line in table if line.startswith(f"| `{original}`"))
        expected = re.search(r"`([0-9a-f]{64})`", row).group(1)
        data = (assets.ASSETS_DIR / name).read_bytes()
        unpacked = gzip.decompress(data) if name.endswith(".gz") else data
        assert sha256(unpacked) == expected, name
        assert unpacked == (shared_data / original).read_bytes(), name
        assert name in (assets.ASSETS_DIR / "README.md").read_text(encoding="utf-8") and expected in (
            assets.ASSETS_DIR / "README.md"
        ).read_text(encoding="utf-8")
    assert sources.SMS_SPAM_SHA256 in "\n".join(table) and sources.INSTRUCTION_DATA_SHA256 in "\n".join(table)
    assert tk.VOCAB_BPE_SHA256 in "\n".join(table) and tk.ENCODER_JSON_SHA256 in "\n".join(table)


def test_package_data_lists_every_asset():
    """A non-editable install ships only what pyproject.toml lists."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["package-data"]["jaxft.assets"])
    present = {
        str(path.relative_to(assets.ASSETS_DIR))
        for path in assets.ASSETS_DIR.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".py"
    }
    assert listed == present
    notice = (assets.ASSETS_DIR / "NOTICE").read_text(encoding="utf-8")
    for credit in ("Sebastian Raschka", "Apache License, Version 2.0", "Almeida", "Gómez Hidalgo", "Yamakami", "CC BY 4.0", "OpenAI"):
        assert credit in notice


def test_bundled_sms_spam_gives_the_reference_splits(shared_data, no_network):
    path = sources.sms_spam_file()
    assert path.parent.parent == assets.ASSETS_DIR and sha256(path.read_bytes()) == sources.SMS_SPAM_SHA256
    ours = spam.splits(path)
    assert [len(frame) for frame in ours] == [1045, 149, 300]
    for mine, theirs in zip(ours, spam.splits(shared_data / "sms_spam_collection" / "SMSSpamCollection")):
        pd.testing.assert_frame_equal(mine, theirs)


def test_bundled_instruction_data_gives_the_reference_splits(shared_data, no_network):
    path = sources.instruction_data_file()
    assert path.parent == assets.ASSETS_DIR and sha256(path.read_bytes()) == sources.INSTRUCTION_DATA_SHA256
    entries = instruct.load_entries(path)
    assert entries == instruct.load_entries(shared_data / "instruction-data.json")
    splits = instruct.split_entries(entries)
    assert (len(splits.train), len(splits.test), len(splits.validation)) == (935, 110, 55)


def test_a_damaged_bundled_data_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "instruction-data.json").write_text("[]")
    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path)
    with pytest.raises(assets.ChecksumError) as info:
        sources.instruction_data_file()
    message = str(info.value)
    assert message == (
        f"{tmp_path / 'instruction-data.json'}: SHA-256 {sha256(b'[]')} does not match the expected "
        f"{sources.INSTRUCTION_DATA_SHA256}"
    )
    with pytest.raises(FileNotFoundError, match="bundled file missing"):
        sources.sms_spam_file()


# ----------------------------------------------------------------------------- SMS spam downloads


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_sms_spam_download_extracts_verifies_then_skips(server, tmp_path, capsys):
    server.files["/sms.zip"] = _zip({"SMSSpamCollection": FAKE_COLLECTION, "readme": b"about"})
    dest = tmp_path / "data"
    urls = [f"{server.url}/missing.zip", f"{server.url}/sms.zip"]  # the primary fails (404), the backup works
    path = sources.sms_spam_file(download=True, data_dir=dest, urls=urls, sha256=sha256(FAKE_COLLECTION), progress=False)
    assert path == dest / "SMSSpamCollection" and path.read_bytes() == FAKE_COLLECTION
    # Only the member needed: UCI's readme is bundled, not extracted (every member is a risk to bound).
    assert sorted(p.name for p in dest.iterdir()) == ["SMSSpamCollection"]
    assert spam.read_sms_collection(path)["Label"].tolist() == ["ham", "spam"]
    requests = len(server.requests)
    again = sources.sms_spam_file(download=True, data_dir=dest, urls=["http://127.0.0.1:9/x.zip"], sha256=None)
    assert again == path and len(server.requests) == requests
    assert "already exists" in capsys.readouterr().err


def test_sms_spam_download_with_other_bytes_is_refused_and_not_kept(server, tmp_path):
    server.files["/sms.zip"] = _zip({"SMSSpamCollection": FAKE_COLLECTION})
    dest = tmp_path / "data"
    with pytest.raises(sources.ChecksumError) as info:
        sources.sms_spam_file(download=True, data_dir=dest, urls=[f"{server.url}/sms.zip"], progress=False)
    message = str(info.value)
    assert message.startswith(f"{dest / 'SMSSpamCollection'}: SHA-256 {sha256(FAKE_COLLECTION)}")
    assert message.endswith(f"does not match the expected {sources.SMS_SPAM_SHA256}") and "\n" not in message
    assert not (dest / "SMSSpamCollection").exists()  # the next call downloads again


def test_sms_spam_extraction_that_fails_leaves_no_file_to_skip_on(server, tmp_path, monkeypatch):
    """The extracted file is the skip marker: a write that fails (or a run killed during it)
    must leave none, so the next call extracts again instead of tripping over half a file."""
    from jaxft import fileio

    server.files["/sms.zip"] = _zip({"SMSSpamCollection": FAKE_COLLECTION})
    dest = tmp_path / "data"
    real_replace = fileio.os.replace

    def full_disk_at_the_collection(src, dst, *args, **kwargs):  # the final rename of the extracted file fails
        if Path(dst).name == "SMSSpamCollection":
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "replace", full_disk_at_the_collection)
    with pytest.raises(fileio.WriteError, match="SMSSpamCollection: cannot write"):
        sources.sms_spam_file(download=True, data_dir=dest, urls=[f"{server.url}/sms.zip"], sha256=sha256(FAKE_COLLECTION), progress=False)
    assert sorted(p.name for p in dest.iterdir()) == [sources.SMS_SPAM_ZIP]  # no half file, no temporary
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    path = sources.sms_spam_file(download=True, data_dir=dest, urls=[f"{server.url}/sms.zip"], sha256=sha256(FAKE_COLLECTION), progress=False)
    assert path.read_bytes() == FAKE_COLLECTION


def _bomb(member_bytes: int, lie: bool = False) -> bytes:
    """A zip whose SMSSpamCollection inflates from about a thousandth of its size; with `lie`,
    its headers claim 10 bytes (zipfile trusts them; the bound must hold either way)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("SMSSpamCollection", b"\0" * member_bytes)
        archive.writestr("readme", b"\0" * member_bytes)
    data = buffer.getvalue()
    if lie:  # the uncompressed size in the local header (offset 22) and the central directory (offset 24)
        local = data.index(b"PK\x03\x04")
        central = data.index(b"PK\x01\x02")
        data = bytearray(data)
        data[local + 22 : local + 26] = (10).to_bytes(4, "little")
        data[central + 24 : central + 28] = (10).to_bytes(4, "little")
        data = bytes(data)
    return data


@pytest.mark.parametrize("lie", [False, True], ids=["honest-header", "lying-header"])
def test_a_zip_bomb_from_a_mirror_is_refused_without_writing_past_the_bound(server, tmp_path, monkeypatch, lie):
    """1.25 MB from a hostile mirror used to write 1 GB (every member, no bound, before the hash check)."""
    from jaxft import fileio

    bound = 64 * 1024
    server.files["/sms.zip"] = _bomb(64 * 1024 * 1024, lie=lie)  # 64 MB inflated, about 64 KB on the wire
    assert len(server.files["/sms.zip"]) < bound * 2
    dest = tmp_path / "data"
    renamed, inflated = [], []
    real_replace, real_read = fileio.os.replace, zipfile.ZipExtFile.read
    monkeypatch.setattr(fileio.os, "replace", lambda src, dst, *a, **k: (renamed.append(Path(dst).name), real_replace(src, dst, *a, **k)))
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: inflated.append(len(block := real_read(self, n))) or block)
    with pytest.raises(ValueError) as info:
        sources.sms_spam_file(download=True, data_dir=dest, urls=[f"{server.url}/sms.zip"], progress=False, max_bytes=2 * bound)
    message = str(info.value)
    assert "\n" not in message and "SMSSpamCollection" in message
    # an honest header is refused before a byte is inflated; a lying one where the bytes stop matching it
    assert ("would inflate to 67108864 bytes, more than the 131072 allowed" in message) if not lie else ("Bad CRC-32" in message)
    assert "SMSSpamCollection" not in renamed  # nothing was renamed into place
    assert sum(inflated) <= 2 * bound + 1  # nor inflated (in memory or on disk) beyond the bound
    assert not dest.exists() or list(dest.iterdir()) == []  # no member, no temporary, not the bad zip either


def test_a_download_longer_than_its_bound_is_refused(server, tmp_path):
    server.files["/big.zip"] = b"x" * 5000
    with pytest.raises(DownloadError, match="more than 4096 bytes"):
        sources.sms_spam_file(download=True, data_dir=tmp_path / "d", urls=[f"{server.url}/big.zip"], progress=False, max_bytes=4096)
    assert not (tmp_path / "d").exists()
    # the bundled copy's size is well within the default bound, and so is the zip it comes in
    assert sources.SMS_SPAM_BYTES == (sources.asset_path("sms_spam_collection/SMSSpamCollection")).stat().st_size
    assert sources.SMS_SPAM_BYTES * 2 < sources.SMS_SPAM_MAX_BYTES


def test_sms_spam_files_already_there(tmp_path, shared_data):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "SMSSpamCollection.tsv").write_bytes((shared_data / "sms_spam_collection" / "SMSSpamCollection").read_bytes())
    assert sources.sms_spam_file(download=True, data_dir=dest, urls=[], progress=False) == dest / "SMSSpamCollection.tsv"
    (dest / "SMSSpamCollection").write_bytes(FAKE_COLLECTION)  # someone's edited copy: reported, kept
    with pytest.raises(sources.ChecksumError, match="SMSSpamCollection: SHA-256"):
        sources.sms_spam_file(download=True, data_dir=dest, urls=[], progress=False)
    assert (dest / "SMSSpamCollection").read_bytes() == FAKE_COLLECTION


def test_sms_spam_download_failures(server, tmp_path):
    server.files["/broken.zip"] = b"not a zip at all"
    server.files["/empty.zip"] = _zip({"other.txt": b"x"})
    with pytest.raises(ValueError, match="not a valid zip file"):
        sources.sms_spam_file(download=True, data_dir=tmp_path / "a", urls=[f"{server.url}/broken.zip"], progress=False)
    with pytest.raises(ValueError, match=r"the archive has no SMSSpamCollection \(members: \['other.txt'\]\)"):
        sources.sms_spam_file(download=True, data_dir=tmp_path / "b", urls=[f"{server.url}/empty.zip"], progress=False)
    urls = [f"{server.url}/missing.zip", f"{server.url}/gone.zip"]
    with pytest.raises(DownloadError) as info:
        sources.sms_spam_file(download=True, data_dir=tmp_path / "c", urls=urls, progress=False)
    assert "missing.zip" in str(info.value) and "gone.zip" in str(info.value)
    assert not (tmp_path / "c" / "SMSSpamCollection").exists()


# ----------------------------------------------------------------------------- instruction data downloads


def test_instruction_data_download_verifies_then_skips(server, tmp_path, shared_data):
    real = (shared_data / "instruction-data.json").read_bytes()
    server.files["/good.json"] = real
    server.mode["/primary.json"] = "500"
    urls = [f"{server.url}/primary.json", f"{server.url}/good.json"]
    path = sources.instruction_data_file(download=True, data_dir=tmp_path, url=urls, progress=False)
    assert path == tmp_path / "instruction-data.json" and path.read_bytes() == real
    requests = len(server.requests)
    assert sources.instruction_data_file(download=True, data_dir=tmp_path, url="http://127.0.0.1:9/x") == path
    assert len(server.requests) == requests  # present and intact: no request


def test_instruction_data_download_with_other_bytes_is_not_kept(server, tmp_path):
    other = json.dumps([{"instruction": "a", "input": "", "output": "b"}]).encode()
    server.files["/other.json"] = other
    with pytest.raises(DownloadError) as info:
        sources.instruction_data_file(download=True, data_dir=tmp_path, url=f"{server.url}/other.json", progress=False)
    message = str(info.value)
    assert str(tmp_path / "instruction-data.json") in message and "\n" not in message
    assert f"SHA-256 {sha256(other)} does not match the expected {sources.INSTRUCTION_DATA_SHA256}" in message
    assert not (tmp_path / "instruction-data.json").exists()
    # Another data set at another URL: the caller turns the check off.
    path = sources.instruction_data_file(
        download=True, data_dir=tmp_path, url=f"{server.url}/other.json", sha256=None, progress=False
    )
    assert instruct.load_entries(path)[0]["output"] == "b"


def test_instruction_data_already_there_but_different_is_reported_not_replaced(tmp_path):
    path = tmp_path / "instruction-data.json"
    path.write_text('[{"instruction": "mine", "output": "x"}]')
    with pytest.raises(sources.ChecksumError, match=r"instruction-data\.json: SHA-256 \w+ does not match the expected 7e09a9af"):
        sources.instruction_data_file(download=True, data_dir=tmp_path, url="http://127.0.0.1:9/x")
    assert "mine" in path.read_text()


# ----------------------------------------------------------------------------- GPT-2 checkpoints


def _serve_checkpoint(server, root: str, vocab_dir: Path) -> None:
    for name in GPT2_FILES:
        if name == "hparams.json":
            body = json.dumps(SMALL_HPARAMS).encode()
        elif name in (tk.ENCODER_JSON, tk.VOCAB_BPE):
            body = (vocab_dir / name).read_bytes()
        else:
            body = name.encode() * 3
        server.files[f"/{root}/124M/{name}"] = body


def test_gpt2_checkpoint_downloads_once(server, refused_url, tmp_path, shared_data):
    _serve_checkpoint(server, "m", shared_data / "gpt2_vocab")
    roots = [refused_url.rsplit("/", 1)[0], f"{server.url}/m"]
    ckpt = sources.gpt2_checkpoint("gpt2-small (124M)", tmp_path, progress=False, base_urls=roots)
    assert ckpt == tmp_path / "124M" and sorted(p.name for p in ckpt.iterdir()) == sorted(GPT2_FILES)
    requests = len(server.requests)
    assert sources.gpt2_checkpoint("124M", tmp_path, base_urls=[refused_url]) == ckpt
    assert len(server.requests) == requests  # model.ckpt.index present: nothing fetched, nothing checked


def test_gpt2_checkpoint_reports_every_failed_url(server, tmp_path):
    with pytest.raises(DownloadError, match=r"124M/checkpoint.*HTTP 404"):
        sources.gpt2_checkpoint("124M", tmp_path, progress=False, base_urls=[f"{server.url}/none"])
    assert not (tmp_path / "124M" / "model.ckpt.index").exists()
