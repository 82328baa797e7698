"""The downloader against a local HTTP server on 127.0.0.1: fallback, truncation, resume, skip."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jaxft import download
from jaxft.download import DownloadError, download_gpt2, fetch


class FakeServer:
    """Serves `files` (path -> bytes). Per-path behaviour: "500", "404", "truncate", "no-range", "no-head"."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.behaviour: dict[str, str] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, head: bool):
                rng = self.headers.get("Range")
                server.requests.append((self.command, self.path, rng))
                mode = server.behaviour.get(self.path)
                if mode in ("500", "404"):
                    self.send_error(int(mode))
                    return
                if head and mode == "no-head":
                    self.send_error(405)
                    return
                if self.path not in server.files:
                    self.send_error(404)
                    return
                body = server.files[self.path]
                start = 0
                if rng and mode != "no-range" and not head:
                    start = int(rng.split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if head:
                    return
                payload = body[start:]
                if mode == "truncate":
                    payload = payload[: len(payload) // 2]
                self.wfile.write(payload)

            def do_GET(self):
                self._serve(head=False)

            def do_HEAD(self):
                self._serve(head=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def gets(self, path: str) -> list:
        return [r for r in self.requests if r[0] == "GET" and r[1] == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


BODY = bytes(range(256)) * 50


def test_fetch_falls_back_to_the_backup_url(server, tmp_path):
    server.files["/backup/f.bin"] = BODY
    server.behaviour["/primary/f.bin"] = "500"
    out = fetch([f"{server.url}/primary/f.bin", f"{server.url}/backup/f.bin"], tmp_path / "f.bin", progress=False)
    assert out.read_bytes() == BODY
    assert not (tmp_path / "f.bin.part").exists()


def test_all_urls_failing_names_each_url(server, tmp_path):
    server.behaviour["/a"] = "404"
    server.behaviour["/b"] = "500"
    with pytest.raises(DownloadError) as err:
        fetch([f"{server.url}/a", f"{server.url}/b"], tmp_path / "x", progress=False)
    assert "/a" in str(err.value) and "/b" in str(err.value) and "404" in str(err.value)
    assert not (tmp_path / "x").exists()


def test_truncated_body_never_looks_complete(server, tmp_path):
    server.files["/f.bin"] = BODY
    server.behaviour["/f.bin"] = "truncate"
    with pytest.raises(DownloadError, match="received"):
        fetch([f"{server.url}/f.bin"], tmp_path / "f.bin", progress=False)
    assert not (tmp_path / "f.bin").exists()
    assert (tmp_path / "f.bin.part").stat().st_size < len(BODY)


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    server.files["/f.bin"] = BODY
    (tmp_path / "f.bin.part").write_bytes(BODY[:1000])  # what an interrupted run left
    fetch([f"{server.url}/f.bin"], tmp_path / "f.bin", progress=False)
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert server.gets("/f.bin") == [("GET", "/f.bin", "bytes=1000-")]


def test_resume_restarts_when_the_server_ignores_ranges(server, tmp_path):
    server.files["/f.bin"] = BODY
    server.behaviour["/f.bin"] = "no-range"
    (tmp_path / "f.bin.part").write_bytes(b"garbage" * 10)
    fetch([f"{server.url}/f.bin"], tmp_path / "f.bin", progress=False)
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_complete_file_is_skipped_and_wrong_size_refetched(server, tmp_path):
    server.files["/f.bin"] = BODY
    dest = tmp_path / "f.bin"
    dest.write_bytes(BODY)
    fetch([f"{server.url}/f.bin"], dest, progress=False)
    assert server.gets("/f.bin") == []  # only a HEAD request
    dest.write_bytes(b"short")
    fetch([f"{server.url}/f.bin"], dest, progress=False)
    assert dest.read_bytes() == BODY and len(server.gets("/f.bin")) == 1


def test_server_without_head_support(server, tmp_path):
    server.files["/f.bin"] = BODY
    server.behaviour["/f.bin"] = "no-head"
    assert fetch([f"{server.url}/f.bin"], tmp_path / "f.bin", progress=False).read_bytes() == BODY


def test_checkpoint_urls_for_every_size_spelling():
    for spelling in ("124M", "gpt2-small", "gpt2-small (124M)"):
        rows = download.checkpoint_urls(spelling)
        assert [name for name, _ in rows] == list(download.GPT2_FILES)
        assert rows[3][1] == [
            "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/model.ckpt.data-00000-of-00001",
            "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/124M/model.ckpt.data-00000-of-00001",
        ]
    assert download.checkpoint_urls("1558M")[0][1][0].endswith("/1558M/checkpoint")
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        download.checkpoint_urls("13B")


def _serve_fake_checkpoint(server, root: str, hparams: dict):
    for name in download.GPT2_FILES:
        server.files[f"/{root}/124M/{name}"] = json.dumps(hparams).encode() if name == "hparams.json" else name.encode() * 3


def test_download_gpt2_primary_down_uses_backup_then_skips(server, tmp_path):
    hparams = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    _serve_fake_checkpoint(server, "backup", hparams)
    for name in download.GPT2_FILES:
        server.behaviour[f"/primary/124M/{name}"] = "500"
    bases = [f"{server.url}/primary", f"{server.url}/backup"]
    ckpt = download_gpt2("gpt2-small", tmp_path / "models", base_urls=bases, progress=False)
    assert ckpt == tmp_path / "models" / "124M"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(download.GPT2_FILES)
    gets = len([r for r in server.requests if r[0] == "GET"])
    download_gpt2("124M", tmp_path / "models", base_urls=bases, progress=False)
    assert len([r for r in server.requests if r[0] == "GET"]) == gets  # second run downloads nothing


def test_download_gpt2_checks_hparams(server, tmp_path):
    _serve_fake_checkpoint(server, "m", {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24})
    with pytest.raises(DownloadError, match="emb_dim=1024"):
        download_gpt2("124M", tmp_path, base_urls=[f"{server.url}/m"], progress=False)


def test_cli_download(server, tmp_path, capsys):
    from jaxft.cli import main

    _serve_fake_checkpoint(server, "m", {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12})
    assert main(["download", "124M", "--dir", str(tmp_path), "--base-url", f"{server.url}/m"]) == 0
    assert "124M" in capsys.readouterr().out
    server.files.clear()
    code = main(["download", "355M", "--dir", str(tmp_path), "--base-url", f"{server.url}/m"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "hparams.json" in err and len(err.splitlines()) == 1
