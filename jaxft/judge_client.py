"""HTTP clients for an LLM judge: Ollama (`/api/chat`) and OpenAI-compatible servers.

`JudgeClient` talks to one judge model on one server:

- a real health check (server up, model present) with a how-to-fix message otherwise;
- a per-request timeout covering the whole answer (an Ollama stream included);
- retries with exponential backoff on connection errors, timeouts, HTTP 5xx/429 and
  malformed answers; other HTTP errors (`JudgeError`) stop at once, and a server that kept
  failing after every retry raises `JudgeUnavailable`.

Only the standard library (`http.client`): the official `ollama` package would add a runtime
dependency and does not cover OpenAI-compatible servers, and the wire protocol needed (one
POST, JSON lines back) is small. Prompts, scoring and the resumable run are in `jaxft.judge`.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DEFAULT_HOST = "http://localhost:11434"
DEFAULT_MODEL = "llama3"
# The reference's settings "required for deterministic responses".
DEFAULT_OPTIONS: dict[str, Any] = {"seed": 123, "temperature": 0, "num_ctx": 2048}
APIS = ("ollama", "openai")


class JudgeError(RuntimeError):
    """The judge cannot go on (fatal HTTP error, bad server answer); message is for the user."""


class JudgeUnavailable(JudgeError):
    """The server is down, lacks the model, or kept failing after all retries."""


class _Transient(Exception):
    """A failure worth retrying: connection trouble, timeout, 5xx/429, a malformed answer."""


def normalize_host(host: str, api: str = "ollama") -> str:
    """`host` with a scheme and without a trailing slash (or, for OpenAI, a trailing /v1)."""
    host = host.strip().rstrip("/")
    if "://" not in host:
        host = "http://" + host
    if api == "openai" and host.endswith("/v1"):
        host = host[: -len("/v1")]
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--host: not an http(s) URL: {host!r}")
    return host


@contextmanager
def _request(
    url: str, method: str, timeout: float, payload: object = None, headers: Mapping[str, str] | None = None
) -> Iterator[tuple[http.client.HTTPResponse, Any]]:
    """Send one request on a fresh connection; yield (response, socket)."""
    parts = urlsplit(url)
    conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_class(parts.hostname, parts.port, timeout=timeout)
    body = None if payload is None else json.dumps(payload).encode("utf-8")
    all_headers = {"Accept": "application/json", **(headers or {})}
    if body is not None:
        all_headers["Content-Type"] = "application/json"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    response = None
    try:
        conn.request(method, path, body=body, headers=all_headers)
        sock = conn.sock  # kept: getresponse() detaches it from conn on "Connection: close"
        response = conn.getresponse()
        yield response, sock
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(_describe(exc)) from exc
    finally:
        if response is not None:
            response.close()
        conn.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed in the middle of the answer"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "connection closed without an answer"
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


def _error_text(raw: bytes) -> str:
    """The error message in a server's error body ({"error": ...} or plain text)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        err = json.loads(text).get("error", text)
        if isinstance(err, dict):  # OpenAI style: {"error": {"message": ...}}
            err = err.get("message", err)
        text = str(err)
    except (ValueError, AttributeError):
        pass
    return text[:300]


def _check_status(response: http.client.HTTPResponse, what: str) -> None:
    if response.status == 200:
        return
    message = f"{what}: HTTP {response.status}: {_error_text(response.read(4096))}"
    if response.status >= 500 or response.status in (408, 429):
        raise _Transient(message)
    raise JudgeError(message)


@dataclass(frozen=True)
class JudgeClient:
    """Talks to one judge model on one server.

    `timeout` bounds each request (the whole answer must arrive within it); a failed
    request is retried `retries` times after sleeping backoff, 2*backoff, ... (at most
    `max_backoff`) seconds with `sleep` (injectable so tests do not wait).
    """

    host: str = DEFAULT_HOST
    model: str = DEFAULT_MODEL
    api: str = "ollama"
    options: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_OPTIONS))
    timeout: float = 120.0
    retries: int = 4
    backoff: float = 1.0
    max_backoff: float = 30.0
    api_key: str | None = None
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"--api: expected one of {', '.join(APIS)}, got {self.api!r}")
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0:
            raise ValueError("timeout must be > 0, retries and backoff >= 0")
        object.__setattr__(self, "host", normalize_host(self.host, self.api))

    @property
    def setup(self) -> dict[str, Any]:
        """What determines the scores (the host does not: the same model anywhere is the same)."""
        return {"api": self.api, "model": self.model, "options": dict(self.options)}

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _get_json(self, path: str) -> Any:
        with _request(self.host + path, "GET", min(self.timeout, 30.0), headers=self._headers()) as (resp, _):
            _check_status(resp, f"GET {path}")
            raw = resp.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise JudgeError(f"GET {self.host}{path}: the answer is not JSON; is this an {self.api} server?") from None

    # -- health check --------------------------------------------------------------------
    def check(self) -> None:
        """Raise JudgeUnavailable with a how-to-fix message unless the server serves the model."""
        try:
            if self.api == "ollama":
                with _request(self.host + "/", "GET", min(self.timeout, 10.0)) as (resp, _):
                    resp.read()
                models = [m.get("name") or m.get("model", "") for m in self._get_json("/api/tags").get("models", [])]
                found = self.model in models or f"{self.model}:latest" in models
            else:
                models = [m.get("id", "") for m in self._get_json("/v1/models").get("data", [])]
                found = self.model in models
        except _Transient as exc:
            raise JudgeUnavailable(self._down_message(str(exc))) from None
        except (JudgeError, AttributeError, TypeError) as exc:
            hint = " (pass --api-key)" if "HTTP 401" in str(exc) or "HTTP 403" in str(exc) else ""
            raise JudgeUnavailable(
                f"the {self.api} server at {self.host} answered oddly: {exc}{hint}. "
                f"Is it really an {self.api} server? (choose with --api ollama|openai)"
            ) from None
        if not found:
            raise JudgeUnavailable(self._missing_model_message(models))

    def _down_message(self, reason: str) -> str:
        if self.api == "ollama":
            how = "Start it with `ollama serve` (install: https://ollama.com)"
        else:
            how = ("Start it (e.g. `vllm serve MODEL`, `llama-server -m MODEL.gguf`, "
                   "or `ollama serve` for Ollama's /v1 endpoint)")
        return f"cannot reach the {self.api} server at {self.host} ({reason}). {how}, or pass --host URL."

    def _missing_model_message(self, models: Sequence[str]) -> str:
        have = ", ".join(models) if models else "no models"
        if self.api == "ollama":
            how = f"Pull it with `ollama pull {self.model}`"
        else:
            how = "Load it in the server"
        return (f"model '{self.model}' is not available on the {self.api} server at {self.host} "
                f"(it has: {have}). {how}, or pass --model NAME.")

    # -- chat ----------------------------------------------------------------------------
    def chat(self, prompt: str) -> str:
        """The model's answer to one user message, with retries; JudgeUnavailable when exhausted."""
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                if self.api == "ollama":
                    return self._chat_ollama(prompt)
                return self._chat_openai(prompt)
            except _Transient as exc:
                last = str(exc)
                if isinstance(exc.__cause__, TimeoutError):
                    last = f"no complete answer within {self.timeout:g} s"
                if attempt + 1 < attempts:
                    self.sleep(min(self.backoff * 2**attempt, self.max_backoff))
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        raise JudgeUnavailable(f"the {self.api} server at {self.host} gave up after {tries} (last: {last})")

    def _chat_ollama(self, prompt: str) -> str:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "options": dict(self.options),
            "stream": True,
        }
        deadline = time.monotonic() + self.timeout
        parts: list[str] = []
        with _request(self.host + "/api/chat", "POST", self.timeout, payload, self._headers()) as (resp, sock):
            if resp.status == 404:
                raise JudgeError(f"model '{self.model}' not found on {self.host}: {_error_text(resp.read(4096))}. "
                                 f"Pull it with `ollama pull {self.model}`.")
            _check_status(resp, "POST /api/chat")
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Transient(f"no complete answer within {self.timeout:g} s")
                if sock is not None:
                    sock.settimeout(remaining)  # the deadline covers the whole stream
                raw = resp.readline()
                if not raw:
                    raise _Transient("the answer stream ended before its final 'done' line")
                line = raw.strip()
                if not line:
                    continue
                try:
                    message = json.loads(line)
                    if "error" in message:
                        raise _Transient(f"server error in the stream: {message['error']}")
                    parts.append(message.get("message", {}).get("content", ""))
                except (ValueError, AttributeError, TypeError):
                    raise _Transient(f"malformed line in the answer stream: {line[:80]!r}") from None
                if message.get("done"):
                    return "".join(parts)

    def _chat_openai(self, prompt: str) -> str:
        # OpenAI takes sampling settings at the top level; num_ctx is Ollama-only.
        settings = {k: v for k, v in self.options.items() if k != "num_ctx"}
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "stream": False, **settings}
        with _request(self.host + "/v1/chat/completions", "POST", self.timeout, payload, self._headers()) as (resp, _):
            _check_status(resp, "POST /v1/chat/completions")
            raw = resp.read()
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Transient(f"malformed answer: {raw[:80]!r}") from None
        if not isinstance(content, str):
            raise _Transient(f"malformed answer: {raw[:80]!r}")
        return content
