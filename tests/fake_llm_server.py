"""A fake LLM server on 127.0.0.1 for the judge tests.

It speaks the two protocols `jaxft.judge` uses:
- Ollama: ``GET /`` ("Ollama is running"), ``GET /api/tags`` (model list), ``POST /api/chat``
  answered as streamed JSON lines (chunked transfer encoding, like the real server);
- OpenAI-compatible: ``GET /v1/models`` and ``POST /v1/chat/completions``.

The answer to a scoring prompt is deterministic: `fake_score` of the model response found in
the prompt, so a test knows every expected score. Each chat request is handled according to a
mode chosen by ``behaviour(n)`` (n = 0-based count of chat requests so far):

- ``ok``: a normal answer;
- ``500``: HTTP 500;
- ``drop``: the connection is closed before any response;
- ``drop_mid``: status and part of the body are sent, then the connection is closed;
- ``slow``: waits ``slow_seconds`` before a normal answer;
- ``trickle``: a normal Ollama stream, but ``trickle_seconds`` pass between lines (each line
  arrives quickly enough for a per-read timeout, the whole answer may not);
- ``garbage``: a line that is not JSON in the middle of the stream (body for OpenAI);
- ``truncated``: the stream ends cleanly without the final ``done`` line (Ollama only);
- ``error_line``: an ``{"error": ...}`` line in the stream (Ollama only).

``chat_requests`` is in the client's order (a sequential client sends a request only after the
previous answer). ``answered`` is in the order the handler threads finish, which a busy machine
may swap: a handler still writing its last chunk while the client's next request is answered
(``finish_seconds`` pauses there, to test that the tests do not depend on it).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RESPONSE_IN_PROMPT = re.compile(r"score the model response `(.*)` on a scale", re.DOTALL)


def fake_score(model_response: str) -> int:
    """The fake judge's score for a model response: a stable hash mapped to 0..100."""
    return int(hashlib.sha256(model_response.encode("utf-8")).hexdigest(), 16) % 101


def response_in_prompt(prompt: str) -> str:
    """The model response quoted in a seed-style prompt (the whole prompt otherwise)."""
    found = _RESPONSE_IN_PROMPT.search(prompt)
    return found.group(1) if found else prompt


def _default_answer(prompt: str) -> str:
    return str(fake_score(response_in_prompt(prompt)))


class FakeLLMServer:
    """A scriptable Ollama/OpenAI server on an ephemeral loopback port."""

    def __init__(
        self,
        models: tuple[str, ...] = ("llama3:latest",),
        answer: Callable[[str], str] = _default_answer,
        slow_seconds: float = 2.0,
        trickle_seconds: float = 0.1,
        finish_seconds: float = 0.0,
    ) -> None:
        self.models = list(models)
        self.answer = answer
        self.slow_seconds = slow_seconds
        self.trickle_seconds = trickle_seconds
        self.finish_seconds = finish_seconds
        self.behaviour: Callable[[int], str] = lambda n: "ok"
        self.chat_requests: list[dict] = []  # every chat request body, failed ones included
        self.answered: list[str] = []  # prompts that got a complete, normal answer
        self._lock = threading.Lock()
        self._release = threading.Event()  # wakes "slow" handlers when the server stops
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control -------------------------------------------------------------------------
    def script(self, *modes: str) -> None:
        """Answer the next chat requests with `modes` in order, then normally."""
        start = len(self.chat_requests)
        self.behaviour = lambda n: modes[n - start] if 0 <= n - start < len(modes) else "ok"

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "FakeLLMServer":
        self._release.clear()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd = None

    # -- used by the handler -------------------------------------------------------------
    def next_mode(self, body: dict) -> str:
        with self._lock:
            n = len(self.chat_requests)
            self.chat_requests.append(body)
        return self.behaviour(n)

    def has_model(self, name: str) -> bool:
        return any(name in (m, m.removesuffix(":latest")) for m in self.models)

    def record_answer(self, prompt: str) -> None:
        with self._lock:
            self.answered.append(prompt)


@contextmanager
def serve(**kwargs) -> Iterator[FakeLLMServer]:
    """Run a `FakeLLMServer` for the duration of a with-block."""
    server = FakeLLMServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()


def unused_url() -> str:
    """A loopback URL where nothing listens (a port just bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeLLM/1.0"

    @property
    def fake(self) -> FakeLLMServer:
        return self.server.fake  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet test output
        pass

    def handle(self) -> None:
        # A client that gave up (timeout) makes our late write fail: that is expected here.
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- plumbing ------------------------------------------------------------------------
    def _send_json(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _abort(self) -> None:
        """Close the socket at once, mid-response."""
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    # -- routes --------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.path == "/":
            data = b"Ollama is running"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/api/tags":
            self._send_json(200, {"models": [{"name": m, "model": m} for m in self.fake.models]})
        elif self.path == "/v1/models":
            data = [{"id": m, "object": "model", "owned_by": "fake"} for m in self.fake.models]
            self._send_json(200, {"object": "list", "data": data})
        else:
            self._send_json(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path not in ("/api/chat", "/v1/chat/completions"):
            self._send_json(404, {"error": "not found"})
            return
        mode = self.fake.next_mode(body)
        if not self.fake.has_model(body.get("model", "")):
            self._send_json(404, {"error": f'model "{body.get("model")}" not found, try pulling it first'})
            return
        if mode == "500":
            self._send_json(500, {"error": "internal server error"})
            return
        if mode == "drop":
            self._abort()
            return
        if mode == "slow" and self.fake._release.wait(self.fake.slow_seconds):
            return  # the server is stopping
        prompt = body["messages"][-1]["content"]
        answer = self.fake.answer(prompt)
        if self.path == "/api/chat":
            self._ollama_answer(body, answer, mode)
        else:
            self._openai_answer(body, answer, mode)
        if mode in ("ok", "slow", "trickle"):
            self.fake.record_answer(prompt)

    def _ollama_answer(self, body: dict, answer: str, mode: str) -> None:
        model = body["model"]
        if body.get("stream", True) is False:
            message = {"role": "assistant", "content": answer}
            self._send_json(200, {"model": model, "message": message, "done": True})
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def line(content: str, done: bool = False) -> bytes:
            payload = {"model": model, "created_at": "2024-01-01T00:00:00Z",
                       "message": {"role": "assistant", "content": content}, "done": done}
            if done:
                payload["done_reason"] = "stop"
            return json.dumps(payload).encode() + b"\n"

        pieces = [answer[i : i + 2] for i in range(0, len(answer), 2)] or [""]
        if mode == "trickle":
            pieces = [""] * 5 + pieces
        for i, piece in enumerate(pieces):
            if mode == "trickle" and self.fake._release.wait(self.fake.trickle_seconds):
                return  # the server is stopping
            self._chunk(line(piece))
            if i == 0 and mode == "garbage":
                self._chunk(b"<html>502 Bad Gateway</html>\n")
            if i == 0 and mode == "error_line":
                self._chunk(json.dumps({"error": "model runner has unexpectedly stopped"}).encode() + b"\n")
                self._chunk(b"")
                return
            if i == 0 and mode == "drop_mid":
                self._abort()
                return
        if mode != "truncated":
            self._chunk(line("", done=True))
        if self.fake.finish_seconds:  # the client has its answer; this thread is late to finish
            self.fake._release.wait(self.fake.finish_seconds)
        self._chunk(b"")  # terminating zero-length chunk

    def _openai_answer(self, body: dict, answer: str, mode: str) -> None:
        payload = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
        }
        data = b"<html>502 Bad Gateway</html>" if mode == "garbage" else json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if mode == "drop_mid":
            self.wfile.write(data[: len(data) // 2])
            self._abort()
            return
        self.wfile.write(data)
