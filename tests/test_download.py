"""The downloader against a local HTTP server on 127.0.0.1: fallback, truncation, resume, skip."""

from __future__ import annotations

import argparse
import hashlib
import json

import pytest

from jaxft import download
from jaxft.cli import CLIError
from jaxft.cli import weights as weights_cli
from jaxft.download import DownloadError, download_gpt2, fetch, partial_path

BODY = bytes(range(256)) * 40  # 10,240 bytes
SMALL_HPARAMS = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}


# ----------------------------------------------------------------------------- fetch


@pytest.mark.parametrize("failure", ["404", "500", "refused"])
def test_failing_primary_falls_back_to_backup(server, refused_url, tmp_path, failure):
    server.files["/backup/f.bin"] = BODY
    primary = refused_url if failure == "refused" else f"{server.url}/primary/f.bin"
    server.mode["/primary/f.bin"] = failure
    out = fetch([primary, f"{server.url}/backup/f.bin"], tmp_path / "f.bin", progress=False)
    assert out == tmp_path / "f.bin" and out.read_bytes() == BODY
    assert not partial_path(out).exists()
    assert len(server.of("GET", "/primary/f.bin")) == (0 if failure == "refused" else 1)


def test_every_url_failing_is_named_with_its_reason(server, refused_url, tmp_path):
    server.mode["/a"] = "404"
    urls = [f"{server.url}/a", refused_url]
    with pytest.raises(DownloadError) as err:
        fetch(urls, tmp_path / "new" / "dir" / "x.bin", progress=False)
    message = str(err.value)
    assert urls[0] in message and "HTTP 404" in message
    assert urls[1] in message and "refused" in message.lower()
    assert [url for url, _ in err.value.failures] == urls and "\n" not in message
    assert not (tmp_path / "new").exists()  # the directories made for it are gone again, empty


def test_truncated_body_never_looks_complete(server, tmp_path):
    server.files["/f.bin"] = BODY
    server.mode["/f.bin"] = "truncate"
    dest = tmp_path / "new" / "f.bin"
    with pytest.raises(DownloadError, match=f"short body: got {len(BODY) // 2} of {len(BODY)} bytes"):
        fetch([f"{server.url}/f.bin"], dest, progress=False)
    assert not dest.exists()
    assert partial_path(dest).read_bytes() == BODY[: len(BODY) // 2]  # kept for a resume


def test_truncated_primary_is_finished_by_the_backup_with_a_range_request(server, tmp_path):
    server.files["/p/f.bin"] = server.files["/b/f.bin"] = BODY
    server.mode["/p/f.bin"] = "truncate"
    out = fetch([f"{server.url}/p/f.bin", f"{server.url}/b/f.bin"], tmp_path / "f.bin", progress=False)
    assert out.read_bytes() == BODY
    assert server.of("GET", "/b/f.bin") == [("GET", "/b/f.bin", f"bytes={len(BODY) // 2}-")]


def test_interrupted_run_is_resumed_by_the_next_run(server, tmp_path):
    server.files["/f.bin"] = BODY
    server.mode["/f.bin"] = "truncate"  # the first run's connection drops half-way
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError):
        fetch([f"{server.url}/f.bin"], dest, progress=False)
    del server.mode["/f.bin"]
    fetch([f"{server.url}/f.bin"], dest, progress=False)
    assert dest.read_bytes() == BODY and not partial_path(dest).exists()
    assert server.of("GET")[-1] == ("GET", "/f.bin", f"bytes={len(BODY) // 2}-")


def test_leftover_part_resumes_with_a_range_request(server, tmp_path):
    server.files["/f.bin"] = BODY
    partial_path(tmp_path / "f.bin").write_bytes(BODY[:1000])
    fetch([f"{server.url}/f.bin"], tmp_path / "f.bin", progress=False)
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert server.of("GET") == [("GET", "/f.bin", "bytes=1000-")]


def test_resume_restarts_when_the_server_ignores_range(server, tmp_path):
    server.files["/f.bin"] = BODY
    server.mode["/f.bin"] = "no-range"
    partial_path(tmp_path / "f.bin").write_bytes(b"garbage" * 10)
    fetch([f"{server.url}/f.bin"], tmp_path / "f.bin", progress=False)
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_complete_part_is_renamed_and_oversized_part_restarted(server, tmp_path):
    server.files["/f.bin"] = BODY
    partial_path(tmp_path / "a.bin").write_bytes(BODY)  # crashed between the last byte and the rename
    assert fetch([f"{server.url}/f.bin"], tmp_path / "a.bin", progress=False).read_bytes() == BODY
    partial_path(tmp_path / "b.bin").write_bytes(BODY + b"stale tail")  # some other file's leftovers
    assert fetch([f"{server.url}/f.bin"], tmp_path / "b.bin", progress=False).read_bytes() == BODY
    assert [r[2] for r in server.of("GET")] == [f"bytes={len(BODY)}-", f"bytes={len(BODY) + 10}-", None]


def test_complete_file_is_skipped_and_wrong_size_redownloaded(server, tmp_path):
    server.files["/f.bin"] = BODY
    dest = tmp_path / "f.bin"
    dest.write_bytes(BODY)
    fetch([f"{server.url}/f.bin"], dest, progress=False)
    assert server.of("GET") == [] and len(server.of("HEAD")) == 1  # the size check only
    dest.write_bytes(b"short")
    fetch([f"{server.url}/f.bin"], dest, progress=False)
    assert dest.read_bytes() == BODY and len(server.of("GET")) == 1


def test_existing_file_is_kept_when_no_server_answers(refused_url, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"from an earlier, verified run")
    assert fetch([refused_url], dest, progress=False).read_bytes() == b"from an earlier, verified run"


def test_server_without_head_support(server, tmp_path):
    server.files["/f.bin"] = BODY
    server.mode["/f.bin"] = "no-head"
    dest = fetch([f"{server.url}/f.bin"], tmp_path / "f.bin", progress=False)
    assert dest.read_bytes() == BODY
    fetch([f"{server.url}/f.bin"], dest, progress=False)  # HEAD refused: the file is kept
    assert len(server.of("GET")) == 1


def test_sha256_skips_without_any_request_and_rejects_a_wrong_body(server, tmp_path):
    good = hashlib.sha256(BODY).hexdigest()
    dest = tmp_path / "f.bin"
    dest.write_bytes(BODY)
    fetch([f"{server.url}/f.bin"], dest, progress=False, sha256=good)
    assert server.requests == []
    server.files["/f.bin"] = BODY[::-1]  # right size, wrong bytes
    dest.write_bytes(b"corrupt")
    with pytest.raises(DownloadError, match="SHA-256"):
        fetch([f"{server.url}/f.bin"], dest, progress=False, sha256=good)
    assert dest.read_bytes() == b"corrupt"  # not replaced by a body that fails the check
    assert not partial_path(dest).exists()  # and nothing wrong is left to resume from


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "no-content-length"])
def test_a_body_longer_than_max_bytes_is_refused_and_not_kept(server, tmp_path, monkeypatch, announced):
    """A hostile or broken mirror cannot make fetch write more than its bound: an announced
    length is refused before reading, an unannounced one once the stream passes the bound."""
    server.files["/big"], server.files["/ok"] = BODY * 4, BODY
    if not announced:
        monkeypatch.setattr(download, "_content_length", lambda headers: None)
    writes = []
    real_copy = download._copy
    monkeypatch.setattr(download, "_copy", lambda response, fh, *a: real_copy(response, _Counting(fh, writes), *a))
    out = fetch([f"{server.url}/big", f"{server.url}/ok"], tmp_path / "f.bin", progress=False, max_bytes=len(BODY))
    assert out.read_bytes() == BODY  # the next URL
    assert not partial_path(out).exists()
    assert sum(writes) <= 2 * len(BODY)  # at most the bound from /big (none when announced), then /ok
    with pytest.raises(DownloadError, match=f"more than {len(BODY) - 1} bytes, far more than the file should have: refused"):
        fetch(f"{server.url}/ok", tmp_path / "g.bin", progress=False, max_bytes=len(BODY) - 1)
    assert not (tmp_path / "g.bin").exists() and not partial_path(tmp_path / "g.bin").exists()


class _Counting:
    def __init__(self, fh, writes: list[int]) -> None:
        self.fh, self.writes = fh, writes

    def write(self, data: bytes) -> int:
        self.writes.append(len(data))
        return self.fh.write(data)


def test_progress_bar_and_skip_message(server, tmp_path, capsys):
    server.files["/f.bin"] = BODY
    fetch([f"{server.url}/f.bin"], tmp_path / "f.bin", desc="my-file")
    fetch([f"{server.url}/f.bin"], tmp_path / "f.bin", desc="my-file")
    err = capsys.readouterr().err
    assert "my-file" in err and "already complete" in err


# ----------------------------------------------------------------------------- GPT-2 checkpoints


def test_checkpoint_urls_for_every_size_spelling():
    for spelling in ("124M", "gpt2-small", "gpt2-small (124M)"):
        rows = download.checkpoint_urls(spelling)
        assert [name for name, _ in rows] == list(download.GPT2_FILES) and len(rows) == 7
        assert rows[3][1] == [
            "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/model.ckpt.data-00000-of-00001",
            "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/124M/model.ckpt.data-00000-of-00001",
        ]
    for spelling, size_dir in (("gpt2-medium", "355M"), ("774M", "774M"), ("gpt2-xl (1558M)", "1558M")):
        assert download.checkpoint_urls(spelling)[0][1][1].endswith(f"/gpt2/{size_dir}/checkpoint")
    assert download.checkpoint_urls("124M", ["http://h/x/"])[2][1] == ["http://h/x/124M/hparams.json"]
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        download.checkpoint_urls("13B")


def _serve_checkpoint(server, root: str, hparams: dict, vocab: dict[str, bytes] | None = None) -> None:
    for name in download.GPT2_FILES:
        body = json.dumps(hparams).encode() if name == "hparams.json" else name.encode() * 3
        server.files[f"/{root}/124M/{name}"] = (vocab or {}).get(name, body)


def test_download_gpt2_falls_back_then_skips_everything(server, tmp_path):
    _serve_checkpoint(server, "backup", SMALL_HPARAMS)
    for name in download.GPT2_FILES:
        server.mode[f"/primary/124M/{name}"] = "500"
    roots = [f"{server.url}/primary", f"{server.url}/backup"]
    ckpt = download_gpt2("gpt2-small (124M)", tmp_path / "models", base_urls=roots, progress=False, verify_vocab=False)
    assert ckpt == tmp_path / "models" / "124M"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(download.GPT2_FILES)
    assert (ckpt / "vocab.bpe").read_bytes() == b"vocab.bpe" * 3
    gets = len(server.of("GET"))
    assert gets == 14  # each file: the failing primary, then the backup
    download_gpt2("124M", tmp_path / "models", base_urls=roots, progress=False, verify_vocab=False)
    assert len(server.of("GET")) == gets  # the second run downloads nothing


def test_download_gpt2_rejects_hparams_of_another_size(server, tmp_path):
    medium = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24}
    _serve_checkpoint(server, "m", medium)
    with pytest.raises(ValueError, match=r"hparams\.json.*n_embd=1024 \(expected 768\)"):
        download_gpt2("124M", tmp_path, base_urls=[f"{server.url}/m"], progress=False, verify_vocab=False)


def test_download_gpt2_verifies_the_vocabulary(server, tmp_path, shared_data):
    vocab = {name: (shared_data / "gpt2_vocab" / name).read_bytes() for name in ("encoder.json", "vocab.bpe")}
    _serve_checkpoint(server, "good", SMALL_HPARAMS, vocab)
    ckpt = download_gpt2("124M", tmp_path / "ok", base_urls=[f"{server.url}/good"], progress=False)
    assert (ckpt / "vocab.bpe").read_bytes() == vocab["vocab.bpe"]
    _serve_checkpoint(server, "bad", SMALL_HPARAMS)  # fake vocabulary files
    with pytest.raises(DownloadError, match="encoder.json.*SHA-256"):
        download_gpt2("124M", tmp_path / "bad", base_urls=[f"{server.url}/bad"], progress=False)
    assert not (tmp_path / "bad" / "124M" / "encoder.json").exists()


# ----------------------------------------------------------------------------- CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxft")
    weights_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_download(server, refused_url, tmp_path, capsys, shared_data):
    vocab = {name: (shared_data / "gpt2_vocab" / name).read_bytes() for name in ("encoder.json", "vocab.bpe")}
    _serve_checkpoint(server, "m", SMALL_HPARAMS, vocab)
    args = _parse(["download", "124M", "--dir", str(tmp_path), "--base-url", refused_url, f"{server.url}/m", "--quiet"])
    assert args.base_url == [refused_url, f"{server.url}/m"]
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "124M")
    assert (tmp_path / "124M" / "model.ckpt.index").read_bytes() == b"model.ckpt.index" * 3

    args = _parse(["download", "355M", "--dir", str(tmp_path), "--base-url", f"{server.url}/m", "--quiet"])
    with pytest.raises(CLIError, match=r"355M/checkpoint.*HTTP 404") as err:
        args.func(args)
    assert "\n" not in str(err.value)

    args = _parse(["download", "13B", "--dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        args.func(args)


def test_cli_defaults():
    args = _parse(["download", "gpt2-small"])
    assert args.dir == "gpt2" and args.base_url is None and args.timeout == 60.0 and not args.quiet
