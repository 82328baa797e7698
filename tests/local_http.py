"""A scripted HTTP server on 127.0.0.1 for the download tests (no other host is ever contacted)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    """Serves `files` (path -> bytes) and records every request as (method, path, Range).

    Per-path `mode`: "404" / "500" (that status), "truncate" (announce the full
    Content-Length, send half and close), "no-range" (ignore Range), "no-head" (405 on HEAD).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.mode: dict[str, str] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a short body ends at close

            def log_message(self, *args):
                pass

            def _serve(self, head: bool) -> None:
                rng = self.headers.get("Range")
                outer.requests.append((self.command, self.path, rng))
                mode = outer.mode.get(self.path)
                if mode in ("404", "500"):
                    return self.send_error(int(mode))
                if (head and mode == "no-head") or self.path not in outer.files:
                    return self.send_error(405 if head and mode == "no-head" else 404)
                body = outer.files[self.path]
                start = 0
                if rng and not head and mode != "no-range":
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if not head:
                    payload = body[start:]
                    self.wfile.write(payload[: len(payload) // 2] if mode == "truncate" else payload)

            def do_GET(self):
                self._serve(head=False)

            def do_HEAD(self):
                self._serve(head=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def of(self, method: str, path: str | None = None) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == method and (path is None or r[1] == path)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
