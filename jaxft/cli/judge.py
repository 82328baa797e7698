"""`jaxft judge`: score instruction responses with an LLM judge (see `jaxft.judge` and
`jaxft.judge_client`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..judge import (
    DEFAULT_TEMPLATE,
    TEMPLATE_FIELDS,
    check_template,
    format_summary,
    load_responses,
    run_judge,
    summarize,
)
from ..judge_client import (
    APIS,
    DEFAULT_HOST,
    DEFAULT_MODEL,
    DEFAULT_OPTIONS,
    JudgeClient,
    JudgeError,
)
from ..judge_compare import check_same_entries, compare_summaries, format_comparison
from ..fileio import atomic_write_text, check_writable
from .commands import COMMANDS
from .common import EXIT_FAILED, EXIT_OK, CLIError


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def default_out(responses: str | os.PathLike, model: str) -> Path:
    """Default score file: `<responses stem>.judge-<model>.jsonl` in the current directory."""
    safe_model = re.sub(r"[^A-Za-z0-9._-]+", "_", model)
    return Path(f"{Path(responses).stem}.judge-{safe_model}.jsonl")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `judge` subcommand."""
    p = subparsers.add_parser(
        "judge",
        help=COMMANDS["judge"].help,
        description="Score every response with an LLM judge, resumably; also report exact match "
                    "and ROUGE-L between 'output' and the response. With --compare A B, judge two "
                    "responses files to the same entries and report A's win rate over B. Exit status 1 "
                    "when no response could be scored (every answer unparsable, or no entries), or with "
                    "--compare when no entry is scored in both.",
    )
    p.add_argument("responses", metavar="RESPONSES.json", nargs="?",
                   help="JSON list of {instruction, input, output, model_response}")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="judge two responses files to the same entries (e.g. a policy's and its reference "
                        "model's) and report both average scores and A's win rate over B (a tie counts half)")
    p.add_argument("--compare-out", nargs=2, metavar=("A.jsonl", "B.jsonl"),
                   help="with --compare: the two score files (default: as --out's default for each file)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"server URL (default {DEFAULT_HOST})")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"judge model (default {DEFAULT_MODEL})")
    p.add_argument("--api", choices=APIS, default="ollama",
                   help="ollama: /api/chat (streamed); openai: /v1/chat/completions (default ollama)")
    p.add_argument("--out", metavar="FILE", help="append-only JSONL of scores, reused to resume "
                   "(default: <RESPONSES stem>.judge-<model>.jsonl in the current directory)")
    p.add_argument("--response-key", default="model_response", help="key of the response to score")
    p.add_argument("--option", metavar="KEY=VALUE", type=_option, action="append", default=[],
                   help="judge option (JSON value) over the defaults seed=123 temperature=0 num_ctx=2048")
    p.add_argument("--template", metavar="FILE", help="prompt template file; placeholders "
                   + ", ".join("{%s}" % f for f in TEMPLATE_FIELDS) + " (default: the reference's prompt)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--retries", type=int, default=4, help="retries per request (default 4)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="first retry delay in seconds, doubled each retry (default 1)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token for OpenAI-compatible servers (default $OPENAI_API_KEY)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON ('-' for stdout)")
    p.add_argument("--rescore-changed", action="store_true",
                   help="score again the entries that changed since they were stored")
    p.add_argument("--retry-unparsed", action="store_true",
                   help="ask the judge again for the stored answers that hold no score (and only those)")
    p.add_argument("--metrics-only", action="store_true",
                   help="skip the judge: report exact match and ROUGE-L only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_command)


def _load_template(args: argparse.Namespace) -> str:
    if not args.template:
        return DEFAULT_TEMPLATE
    template = Path(args.template).read_text(encoding="utf-8")
    try:
        check_template(template)
    except ValueError as exc:
        raise ValueError(f"{args.template}: {exc}") from None
    return template


def _check_outputs(args: argparse.Namespace, outs: list[Path]) -> None:
    # where the results go is checked before any request: a late write error would waste the judging
    given = "--compare-out" if args.compare else "--out"
    targets = [] if args.metrics_only else [(given, out) for out in outs]
    if args.json not in (None, "-"):
        targets.append(("--json", Path(args.json)))
    for flag, path in targets:
        if path.is_dir():
            raise CLIError(f"{path}: is a directory; {flag} is a file to write")
        check_writable(path)


def _judge(args: argparse.Namespace, entries: list[dict], out: Path, template: str,
           sleep: Callable[[float], None]) -> dict[int, dict] | None:
    """The judge's records of `entries` (None with --metrics-only)."""
    if args.metrics_only:
        return None
    client = JudgeClient(host=args.host, model=args.model, api=args.api,
                         options={**DEFAULT_OPTIONS, **dict(args.option)}, timeout=args.timeout,
                         retries=args.retries, backoff=args.backoff, api_key=args.api_key,
                         sleep=sleep)
    try:
        records = run_judge(entries, client, out, response_key=args.response_key, template=template,
                            rescore_changed=args.rescore_changed, retry_unparsed=args.retry_unparsed,
                            progress=not args.no_progress)
    except JudgeError as exc:
        raise CLIError(str(exc)) from None
    return records


def _write_summary(args: argparse.Namespace, summary: dict[str, Any], text: str) -> None:
    if args.json == "-":
        print(json.dumps(summary, indent=2))
    else:
        print(text)
        if args.json:
            atomic_write_text(args.json, json.dumps(summary, indent=2) + "\n")


def _run_command(args: argparse.Namespace, sleep: Callable[[float], None] = time.sleep) -> int:
    if args.compare:
        return _run_compare(args, sleep)
    if args.responses is None:
        raise CLIError("name the responses file to judge (RESPONSES.json), or two with --compare A.json B.json")
    if args.compare_out:
        raise CLIError("--compare-out goes with --compare A.json B.json; for one file use --out")
    entries = load_responses(args.responses, args.response_key)
    template = _load_template(args)
    out = Path(args.out) if args.out else default_out(args.responses, args.model)
    _check_outputs(args, [out])
    records = _judge(args, entries, out, template, sleep)
    summary = summarize(entries, records, args.response_key)
    _write_summary(args, summary, format_summary(summary))
    if records is None and not entries:  # --metrics-only of nothing: as failed as a judge run of nothing
        print(f"jaxft judge: error: {args.responses} holds no entries", file=sys.stderr)
        return EXIT_FAILED
    if records is not None and summary["judge"]["num_scores"] == 0:
        # A run that produced no score at all is a failed run, not an average of nothing.
        print(f"jaxft judge: error: {nothing_scored(summary['judge'], args.responses, out)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def compare_outs(a: str | os.PathLike, b: str | os.PathLike, model: str) -> tuple[Path, Path]:
    """Default score files of `--compare A B`: each file's default, told apart by its
    directory's name where the two files share a name (runs/policy/x.json, runs/ref/x.json)."""
    out_a, out_b = default_out(a, model), default_out(b, model)
    if out_a != out_b or Path(a).resolve() == Path(b).resolve():
        return out_a, out_b
    out_a, out_b = (Path(f"{Path(x).resolve().parent.name}-{default_out(x, model)}") for x in (a, b))
    if out_a == out_b:
        raise CLIError(f"--compare: {a} and {b} would share the score file {out_a}; "
                       "name two with --compare-out A.jsonl B.jsonl")
    return out_a, out_b


def _run_compare(args: argparse.Namespace, sleep: Callable[[float], None]) -> int:
    a, b = args.compare
    if args.responses is not None:
        raise CLIError(f"pass RESPONSES.json or --compare A.json B.json, not both (got {args.responses} too)")
    if args.out:
        raise CLIError("--out names one score file; with --compare use --compare-out A.jsonl B.jsonl")
    if args.metrics_only:
        raise CLIError("--compare compares the judge's scores: it cannot go with --metrics-only")
    files = [load_responses(path, args.response_key) for path in (a, b)]
    check_same_entries(*files, a, b)
    template = _load_template(args)
    outs = [Path(p) for p in args.compare_out] if args.compare_out else list(compare_outs(a, b, args.model))
    if outs[0] == outs[1] and Path(a).resolve() != Path(b).resolve():
        raise CLIError(f"--compare-out: {a} and {b} need two different score files")
    _check_outputs(args, outs)
    summaries = [summarize(entries, _judge(args, entries, out, template, sleep), args.response_key)
                 for entries, out in zip(files, outs)]
    comparison = compare_summaries(*summaries)
    text = "\n\n".join([*(f"== {name}: {path}\n{format_summary(s)}" for name, path, s in zip("AB", (a, b), summaries)),
                         format_comparison(a, b, comparison)])
    summary = {"a": {"responses": str(a), "scores": str(outs[0]), **summaries[0]},
               "b": {"responses": str(b), "scores": str(outs[1]), **summaries[1]}, "comparison": comparison}
    _write_summary(args, summary, text)
    if comparison["pairs"] == 0:
        print(f"jaxft judge: error: no entry is scored in both {a} and {b} (A: {comparison['num_scores_a']} "
              f"scores, B: {comparison['num_scores_b']}); see {outs[0]} and {outs[1]}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def nothing_scored(judge_summary: dict[str, Any], responses: str | os.PathLike, out: Path) -> str:
    """Why a judge run has no score at all (its summary's "judge" part has num_scores 0)."""
    unparsed = len(judge_summary["unparsed"])
    if unparsed:
        plural = "answer" if unparsed == 1 else "answers"
        return f"no response could be scored ({unparsed} {plural} unparsable); see {out}"
    if judge_summary["missing"]:
        return f"no response could be scored ({len(judge_summary['missing'])} not scored yet); see {out}"
    return f"no response could be scored: {responses} holds no entries"
