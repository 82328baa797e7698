"""Score instruction responses with an LLM judge (Ollama or an OpenAI-compatible server).

The reference asks a local llama3 (Ollama, `/api/chat`, options seed 123 / temperature 0 /
num_ctx 2048) to rate every generated response from 0 to 100 and prints the average. This
module does the same job so that a run can be trusted:

- the HTTP client (`jaxft.judge_client.JudgeClient`, re-exported here) checks the server
  and the model before any work, and retries transient failures with backoff;
- every score is appended to a JSONL file as it arrives (keyed by entry index plus a hash of
  the entry and of the judge setup), so a rerun with the same arguments scores only what is
  missing, and a changed responses file or judge setup is detected instead of mixed in;
- answers are parsed leniently ("85", "Score: 85", "85/100", "**85**"); anything else, or a
  value outside 0..100, is recorded as unparsed and reported (as the reference does);
- a summary with the reference's "Number of scores: N of M" / "Average score: X.XX" lines, a
  histogram and the judge-free metrics of `jaxft.textmetrics`; JSON output for scripts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jaxft.data.instruct import format_prompt
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
from jaxft.textmetrics import corpus_metrics, exact_match

# APIS, DEFAULT_HOST, DEFAULT_MODEL, DEFAULT_OPTIONS, JudgeClient, JudgeError, JudgeUnavailable
# and normalize_host are re-exported from jaxft.judge_client.
__all__ = [
    "APIS", "DEFAULT_HOST", "DEFAULT_MODEL", "DEFAULT_OPTIONS", "DEFAULT_TEMPLATE",
    "HISTOGRAM_BINS", "TEMPLATE_FIELDS", "JudgeClient", "JudgeError", "JudgeUnavailable",
    "build_prompt", "check_template", "entry_fingerprint", "format_alpaca_input",
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
    "On a scale from 0 to 100: 85", "Score: 90. It turns 1/4 cup into 4 tablespoons". None for: no
    number, several candidate numbers, a score on another scale ("7/10", "Score: 8/10"), decimals
    ("85.5"), values outside 0..100.
    """
    text = _MARKUP.sub("", answer)
    alone = _ALONE.match(text)
    if alone:
        return _in_range(alone.group(1))
    for numerator, denominator in _FRACTION.findall(text):
        if int(denominator) == 100:
            return _in_range(numerator)
    text = _SCALE.sub(" ", text)
    named = _SCORE_IS.search(text)
    if named:
        # "Score: 8/10" is another scale (not comparable); a fraction elsewhere ("1/4 cup") is text.
        return None if _FRACTION.match(text, named.start(1)) else _in_range(named.group(1))
    # A bare fraction ("7/10") has two numbers: ambiguous below, so None as well.
    numbers = _ANY_INT.findall(text)
    if len(numbers) == 1 and not re.search(r"\d\.\d", text):
        return _in_range(numbers[0])
    return None


def _in_range(digits: str) -> int | None:
    value = int(digits)
    return value if 0 <= value <= 100 else None

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
