"""Score instruction responses with an LLM judge (Ollama or an OpenAI-compatible server).

The reference asks a local llama3 (Ollama, `/api/chat`, options seed 123 / temperature 0 /
num_ctx 2048) to rate every generated response from 0 to 100 and prints the average. This
module does the same job so that a run can be trusted:

- the HTTP client (`jaxft.judge_client.JudgeClient`, re-exported here) checks the server
  and the model before any work, and retries transient failures with backoff;
- every score is appended to a JSONL file as it arrives (keyed by entry index plus a hash of
  the entry and of the judge setup), so a rerun with the same arguments scores only what is
  missing, and a changed responses file or judge setup is detected instead of mixed in;
- a score is read only where the answer states one ("85", "Score: 85", "85/100", "**Score:**
  85", see `jaxft.judge_parse`); a refusal, another scale, a number of the scale's description,
  of the echoed prompt or of the explanation is no score: the answer is recorded as unparsed
  and reported (as the reference does), and `retry_unparsed` asks for it again;
- a stored answer is capped (`MAX_STORED_ANSWER_CHARS`, its head and tail kept);
- a summary with the reference's "Number of scores: N of M" / "Average score: X.XX" lines, a
  histogram and the judge-free metrics of `jaxft.textmetrics`; JSON output for scripts.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jaxft.data.instruct import format_prompt
from jaxft.fileio import WriteError
from jaxft.judge_client import (
    APIS,
    DEFAULT_HOST,
    DEFAULT_MODEL,
    DEFAULT_OPTIONS,
    JudgeClient,
    JudgeError,
    JudgeUnavailable,
    normalize_host,
)
from jaxft.judge_parse import parse_score
from jaxft.textmetrics import corpus_metrics, exact_match

# APIS, DEFAULT_HOST, DEFAULT_MODEL, DEFAULT_OPTIONS, JudgeClient, JudgeError, JudgeUnavailable
# and normalize_host are re-exported from jaxft.judge_client, parse_score from jaxft.judge_parse.
__all__ = [
    "APIS", "DEFAULT_HOST", "DEFAULT_MODEL", "DEFAULT_OPTIONS", "DEFAULT_TEMPLATE",
    "HISTOGRAM_BINS", "MAX_STORED_ANSWER_CHARS", "TEMPLATE_FIELDS", "JudgeClient", "JudgeError", "JudgeUnavailable",
    "build_prompt", "cap_answer", "check_template", "entry_fingerprint", "format_alpaca_input",
    "format_summary", "histogram", "judge_fingerprint", "load_responses", "load_scores",
    "normalize_host", "parse_score", "run_judge", "summarize",
]

# The reference's scoring prompt. Placeholders: {prompt} (the Alpaca-formatted instruction and
# input), {instruction}, {input}, {output}, {model_response}.
DEFAULT_TEMPLATE = (
    "Given the input `{prompt}` and correct output `{output}`, "
    "score the model response `{model_response}` on a scale from 0 to 100, "
    "where 100 is the best score. Respond with the integer number only."
)
TEMPLATE_FIELDS = ("prompt", "instruction", "input", "output", "model_response")


# --------------------------------------------------------------------------------------
# Prompt and answer parsing
# --------------------------------------------------------------------------------------
def format_alpaca_input(entry: Mapping[str, str]) -> str:
    """The Alpaca-style instruction (and optional input) the reference shows the judge."""
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


# --------------------------------------------------------------------------------------
# Input and the append-only score file
# --------------------------------------------------------------------------------------
def load_responses(path: str | os.PathLike, response_key: str = "model_response") -> list[dict]:
    """Read a responses file (a JSON list of {instruction, input, output, <response_key>})."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
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
            try:
                json.loads(lines[-1])
                with path.open("ab") as f:
                    f.write(b"\n")
            except ValueError:
                with path.open("r+b") as f:
                    f.truncate(len(data) - len(lines[-1]))
                print(f"{path}: dropped an incomplete last line (interrupted write)", file=sys.stderr)
        except OSError as exc:
            raise WriteError(path, exc.strerror or str(exc), exc.errno) from None
        lines = lines[:-1]
    valid: dict[int, dict] = {}
    stale: dict[int, int] = {}  # entry index -> first line scoring an older version of it
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            index, score = record["index"], record["score"]
            if not isinstance(index, int) or not (score is None or isinstance(score, int)) \
                    or not isinstance(record.get("answer"), str):
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


# A judge answers a number, or a paragraph; a runaway generation can answer megabytes. What
# is stored (and read for the score) is its head and tail: where the judge states a score.
MAX_STORED_ANSWER_CHARS = 4000
_CUT = "\n[...]\n"


def cap_answer(answer: str, limit: int = MAX_STORED_ANSWER_CHARS) -> str:
    """`answer`, or its first and last `limit // 2` characters around a "[...]" line."""
    if len(answer) <= limit:
        return answer
    return answer[: limit // 2] + _CUT + answer[-(limit // 2):]


def _append(path: Path, record: Mapping[str, Any], done: int, total: int) -> None:
    # One write per record, flushed and synced: an interruption loses at most this line. A
    # failed write (a full disk) is cut back off, so that the file holds whole records only.
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WriteError(path, exc.strerror or str(exc), exc.errno) from None
    size = None
    try:
        size = os.fstat(fd).st_size
        view = memoryview(line)
        while view:  # unbuffered: nothing is left to fail again at close
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        try:
            if size is not None:
                os.ftruncate(fd, size)
        except OSError:
            pass  # a torn last line is cut off by the next run (load_scores)
        raise WriteError(path, f"{exc.strerror or exc} ({done} of {total} entries are scored there; "
                               "rerun the same command to resume)", exc.errno) from None
    finally:
        os.close(fd)


def run_judge(
    entries: Sequence[Mapping[str, str]],
    client: JudgeClient,
    store: str | os.PathLike,
    *,
    response_key: str = "model_response",
    template: str = DEFAULT_TEMPLATE,
    rescore_changed: bool = False,
    retry_unparsed: bool = False,
    progress: bool = True,
) -> dict[int, dict]:
    """Score every entry not yet in `store` and return all records by entry index.

    A stored answer is never asked again, except an unparsed one with `retry_unparsed` (the
    new record is appended; the newest wins). Stored answers are read again with the current
    `parse_score`, so a store written by an older, laxer parser gives today's scores. The server
    is checked only when something is left to score. When the server fails for good,
    JudgeUnavailable says how far the run got; the same call later resumes there. A failed
    write is a WriteError naming `store`.
    """
    check_template(template)
    store = Path(store)
    fingerprints = [entry_fingerprint(e, response_key) for e in entries]
    judge_key = judge_fingerprint(client.setup, template)
    records = load_scores(store, fingerprints, judge_key, rescore_changed)
    changed = 0
    for i, record in records.items():
        score = parse_score(record["answer"], build_prompt(entries[i], response_key, template))
        changed += score != record["score"]
        record["score"] = score
    if changed:
        print(f"{store}: {changed} stored score(s) differ from their answers read again (by today's "
              "stricter parser); the summary uses the answers' scores", file=sys.stderr)
    todo = [i for i in range(len(entries))
            if i not in records or (retry_unparsed and records[i]["score"] is None)]
    if not todo:
        return records
    client.check()
    store.parent.mkdir(parents=True, exist_ok=True)
    done = len(records) - sum(i in records for i in todo)
    with tqdm(total=len(entries), initial=done, desc="Scoring entries", unit="entry",
              disable=not progress) as bar:
        for i in todo:
            prompt = build_prompt(entries[i], response_key, template)
            try:
                answer = client.chat(prompt)
            except JudgeError as exc:
                raise type(exc)(
                    f"entry {i}: {exc}. {len(records)} of {len(entries)} entries are scored in "
                    f"{store}; rerun the same command to resume"
                ) from None
            stored = cap_answer(answer)
            record = {"index": i, "score": parse_score(stored, prompt), "answer": stored,
                      "entry": fingerprints[i], "judge": judge_key, "model": client.model}
            if stored is not answer:
                record["answer_chars"] = len(answer)
            _append(store, record, len(records), len(entries))
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
    """The text report (the reference's two lines first, for scripts that grep them)."""
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
