"""Score instruction responses with an LLM judge (Ollama or an OpenAI-compatible server).

The seed asks a local llama3 (Ollama, `/api/chat`, options seed 123 / temperature 0 /
num_ctx 2048) to rate every generated response from 0 to 100 and prints the average. This
module does the same job so that a run can be trusted:

- a real HTTP health check (server up, model present) before any work;
- per-request timeout, retries with exponential backoff on connection errors, timeouts,
  HTTP 5xx/429 and malformed answers; other HTTP errors stop the run at once;
- every score is appended to a JSONL file as it arrives (keyed by entry index plus a hash of
  the entry and of the judge setup), so a rerun with the same arguments scores only what is
  missing, and a changed responses file or judge setup is detected instead of mixed in;
- answers are parsed leniently ("85", "Score: 85", "85/100", "**85**"); anything else, or a
  value outside 0..100, is recorded as unparsed and reported (as the seed does);
- a summary with the seed's "Number of scores: N of M" / "Average score: X.XX" lines, a
  histogram and the judge-free metrics of `jaxft.textmetrics`; JSON output for scripts.

The HTTP clients use only the standard library (`http.client`): the official `ollama`
package would add a runtime dependency and does not cover OpenAI-compatible servers, and the
wire protocol we need (one POST, JSON lines back) is small.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import string
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from jaxft.textmetrics import corpus_metrics, exact_match

DEFAULT_HOST = "http://localhost:11434"
DEFAULT_MODEL = "llama3"
# The seed's settings "required for deterministic responses".
DEFAULT_OPTIONS: dict[str, Any] = {"seed": 123, "temperature": 0, "num_ctx": 2048}
APIS = ("ollama", "openai")

# The seed's scoring prompt. Placeholders: {prompt} (the Alpaca-formatted instruction and
# input), {instruction}, {input}, {output}, {model_response}.
DEFAULT_TEMPLATE = (
    "Given the input `{prompt}` and correct output `{output}`, "
    "score the model response `{model_response}` on a scale from 0 to 100, "
    "where 100 is the best score. Respond with the integer number only."
)
TEMPLATE_FIELDS = ("prompt", "instruction", "input", "output", "model_response")


class JudgeError(RuntimeError):
    """The judge cannot go on (fatal HTTP error, bad server answer); message is for the user."""


class JudgeUnavailable(JudgeError):
    """The server is down, lacks the model, or kept failing after all retries."""


class _Transient(Exception):
    """A failure worth retrying: connection trouble, timeout, 5xx/429, a malformed answer."""


# --------------------------------------------------------------------------------------
# Prompt and answer parsing
# --------------------------------------------------------------------------------------
def format_alpaca_input(entry: Mapping[str, str]) -> str:
    """The Alpaca-style instruction (and optional input) the seed shows the judge."""
    from .data.instruct import format_prompt

    return format_prompt(entry, "alpaca")


def check_template(template: str) -> None:
    """Raise ValueError when `template` uses a placeholder the judge cannot fill."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:  # e.g. a single "{" that should be doubled
        raise ValueError(f"template: {exc} (write literal braces as '{{{{' and '}}}}')") from None
    unknown = sorted({n for n in names if n not in TEMPLATE_FIELDS})
    if unknown:
        raise ValueError(
            f"template: unknown placeholder(s) {', '.join(unknown)}; known: {', '.join(TEMPLATE_FIELDS)}"
        )


def build_prompt(
    entry: Mapping[str, str], response_key: str = "model_response", template: str = DEFAULT_TEMPLATE
) -> str:
    """The scoring prompt for one entry."""
    return template.format(
        prompt=format_alpaca_input(entry),
        instruction=entry["instruction"],
        input=entry.get("input", ""),
        output=entry["output"],
        model_response=entry[response_key],
    )


_MARKUP = re.compile(r"[*_`#]")
# An integer (sign kept, so "-5" is out of range) that is not part of a decimal or longer number.
_INT = r"(?<![\d.])(-?\d{1,4})(?!\d|\.\d)"
_ALONE = re.compile(rf"^\s*(?:score\s*[:=]?\s*)?{_INT}\s*(?:/\s*100|%|points?)?\s*[.!]?\s*$", re.I)
_FRACTION = re.compile(rf"{_INT}\s*(?:/|out of)\s*(\d+)", re.I)
_SCORE_IS = re.compile(rf"\b(?:score|rating|rate it|grade)\b[^\d\n]{{0,20}}?{_INT}", re.I)
_SCALE = re.compile(r"\b(?:from\s+)?0\s*(?:-|to)\s*100\b", re.I)  # "on a scale from 0 to 100"
_ANY_INT = re.compile(_INT)


def parse_score(answer: str) -> int | None:
    """The 0..100 integer score in a judge's answer, or None when there is none.

    Accepts "85", "85.", "**85**", "Score: 85", "85/100", "85 out of 100", "My score is 85",
    "On a scale from 0 to 100: 85". None for: no number, several candidate numbers, another
    scale ("7/10"), decimals ("85.5"), values outside 0..100.
    """
    text = _MARKUP.sub("", answer)
    alone = _ALONE.match(text)
    if alone:
        return _in_range(alone.group(1))
    fractions = _FRACTION.findall(text)
    for numerator, denominator in fractions:
        if int(denominator) == 100:
            return _in_range(numerator)
    if fractions:  # scored on another scale: not comparable
        return None
    text = _SCALE.sub(" ", text)
    named = _SCORE_IS.search(text)
    if named:
        return _in_range(named.group(1))
    numbers = _ANY_INT.findall(text)
    if len(numbers) == 1 and not re.search(r"\d\.\d", text):
        return _in_range(numbers[0])
    return None


def _in_range(digits: str) -> int | None:
    value = int(digits)
    return value if 0 <= value <= 100 else None


# --------------------------------------------------------------------------------------
# HTTP clients
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Input and the append-only score file
# --------------------------------------------------------------------------------------
def load_responses(path: str | os.PathLike, response_key: str = "model_response") -> list[dict]:
    """Read a responses file (a JSON list of {instruction, input, output, <response_key>})."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, found {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {i} is not an object")
        for key in ("instruction", "output", response_key):
            if not isinstance(entry.get(key), str):
                hint = " (choose the key with --response-key)" if key == response_key else ""
                raise ValueError(f"{path}: entry {i} has no text under '{key}'{hint}")
        if not isinstance(entry.get("input", ""), str):
            raise ValueError(f"{path}: entry {i}: 'input' is not text")
    return data


def _short_hash(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def entry_fingerprint(entry: Mapping[str, str], response_key: str = "model_response") -> str:
    """A hash of what the judge sees of an entry: a changed entry gets a new fingerprint."""
    return _short_hash([entry["instruction"], entry.get("input", ""), entry["output"], entry[response_key]])


def judge_fingerprint(setup: Mapping[str, Any], template: str) -> str:
    """A hash of the judge setup (api, model, options) and the prompt template."""
    return _short_hash({**setup, "template": template})


def load_scores(
    path: Path, fingerprints: Sequence[str], judge_key: str, rescore_changed: bool = False
) -> dict[int, dict]:
    """Valid stored records by entry index.

    A torn last line (a kill in mid-write) is cut off the file. Records of another judge
    setup are an error; records of entries that changed since are an error unless
    `rescore_changed` (then those entries are scored again).
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1].strip():  # no final newline: the last write was cut short
        try:
            json.loads(lines[-1])
            with path.open("ab") as f:
                f.write(b"\n")
        except ValueError:
            with path.open("r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
            print(f"{path}: dropped an incomplete last line (interrupted write)", file=sys.stderr)
        lines = lines[:-1]
    valid: dict[int, dict] = {}
    stale: dict[int, int] = {}  # entry index -> first line scoring an older version of it
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            index, score = record["index"], record["score"]
            if not isinstance(index, int) or not (score is None or isinstance(score, int)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: line {lineno}: not a score record") from None
        if record.get("judge") != judge_key:
            raise ValueError(
                f"{path}: line {lineno}: scored with another judge setup (model {record.get('model')!r}, "
                "options or template differ); pass a different --out or delete the file"
            )
        if 0 <= index < len(fingerprints) and record.get("entry") == fingerprints[index]:
            valid[index] = record
        else:
            stale.setdefault(index, lineno)
    changed = {i: n for i, n in stale.items() if i not in valid}
    if changed and not rescore_changed:
        index, lineno = min(changed.items(), key=lambda item: item[1])
        raise ValueError(
            f"{path}: line {lineno}: entry {index} differs from the one scored there "
            f"({len(changed)} changed entries: the responses file changed?); "
            "pass --rescore-changed to score them again, or a different --out"
        )
    return valid


def _append(path: Path, record: Mapping[str, Any]) -> None:
    # One write per record, flushed and synced: an interruption loses at most this line.
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_judge(
    entries: Sequence[Mapping[str, str]],
    client: JudgeClient,
    store: str | os.PathLike,
    *,
    response_key: str = "model_response",
    template: str = DEFAULT_TEMPLATE,
    rescore_changed: bool = False,
    progress: bool = True,
) -> dict[int, dict]:
    """Score every entry not yet in `store` and return all records by entry index.

    The server is checked only when something is left to score. When the server fails for
    good, JudgeUnavailable says how far the run got; the same call later resumes there.
    """
    check_template(template)
    store = Path(store)
    fingerprints = [entry_fingerprint(e, response_key) for e in entries]
    judge_key = judge_fingerprint(client.setup, template)
    records = load_scores(store, fingerprints, judge_key, rescore_changed)
    todo = [i for i in range(len(entries)) if i not in records]
    if not todo:
        return records
    client.check()
    store.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(entries), initial=len(records), desc="Scoring entries", unit="entry",
              disable=not progress) as bar:
        for i in todo:
            try:
                answer = client.chat(build_prompt(entries[i], response_key, template))
            except JudgeError as exc:
                raise type(exc)(
                    f"entry {i}: {exc}. {len(records)} of {len(entries)} entries are scored in "
                    f"{store}; rerun the same command to resume"
                ) from None
            record = {"index": i, "score": parse_score(answer), "answer": answer,
                      "entry": fingerprints[i], "judge": judge_key, "model": client.model}
            _append(store, record)
            records[i] = record
            bar.update(1)
    return records


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------
HISTOGRAM_BINS = tuple((lo, lo + 9 if lo < 90 else 100) for lo in range(0, 100, 10))


def histogram(scores: Sequence[int]) -> dict[str, int]:
    """Counts of scores in 0-9, 10-19, ..., 80-89, 90-100."""
    counts = {f"{lo}-{hi}": 0 for lo, hi in HISTOGRAM_BINS}
    for s in scores:
        lo, hi = HISTOGRAM_BINS[min(s // 10, 9)]
        counts[f"{lo}-{hi}"] += 1
    return counts


def summarize(
    entries: Sequence[Mapping[str, str]],
    records: Mapping[int, Mapping[str, Any]] | None,
    response_key: str = "model_response",
) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data (`records` None: no judge was run)."""
    refs = [e["output"] for e in entries]
    cands = [e[response_key] for e in entries]
    metrics = corpus_metrics(refs, cands)
    per_entry_rouge = metrics.pop("rouge_l_f1_per_entry")
    summary: dict[str, Any] = {"num_entries": len(entries), "metrics": metrics}
    per_entry: list[dict[str, Any]] = [
        {"index": i, "exact_match": exact_match(r, c), "rouge_l_f1": f}
        for i, (r, c, f) in enumerate(zip(refs, cands, per_entry_rouge))
    ]
    if records is not None:
        scores = [records[i]["score"] if i in records else None for i in range(len(entries))]
        valid = [s for s in scores if s is not None]
        summary["judge"] = {
            "num_scores": len(valid),
            "average": sum(valid) / len(valid) if valid else None,
            "unparsed": [{"index": i, "answer": records[i]["answer"]}
                         for i in sorted(records) if records[i]["score"] is None],
            "missing": [i for i in range(len(entries)) if i not in records],
            "histogram": histogram(valid),
        }
        for row, score in zip(per_entry, scores):
            row["score"] = score
    summary["per_entry"] = per_entry
    return summary


def format_summary(summary: Mapping[str, Any], bar_width: int = 40) -> str:
    """The text report (the seed's two lines first, for scripts that grep them)."""
    n = summary["num_entries"]
    lines: list[str] = []
    judge = summary.get("judge")
    if judge is not None:
        lines.append(f"Number of scores: {judge['num_scores']} of {n}")
        avg = judge["average"]
        lines.append(f"Average score: {avg:.2f}" if avg is not None else "Average score: n/a (no scores)")
        if judge["unparsed"]:
            lines.append(f"Could not convert {len(judge['unparsed'])} answer(s):")
            for item in judge["unparsed"]:
                answer = " ".join(item["answer"].split())
                lines.append(f"  entry {item['index']}: {answer[:70]!r}")
        if judge["missing"]:
            lines.append(f"Not scored yet: {len(judge['missing'])} entries")
        peak = max(judge["histogram"].values()) or 1
        lines.append("Score histogram:")
        for label, count in judge["histogram"].items():
            bar = "#" * (max(1, round(count / peak * bar_width)) if count else 0)
            lines.append(f"  {label:>6} | {bar:<{bar_width}} {count}")
    m = summary["metrics"]
    if n:
        lines.append(f"Exact match (case and whitespace normalised): {m['exact_match']} of {n} "
                     f"({100 * m['exact_match_rate']:.1f}%)")
        lines.append(f"ROUGE-L F1: {m['rouge_l_f1']:.4f} (precision {m['rouge_l_precision']:.4f}, "
                     f"recall {m['rouge_l_recall']:.4f})")
    return "\n".join(lines)
