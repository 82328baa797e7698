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
                    "and ROUGE-L between 'output' and the response. Exit status 1 when no response "
                    "could be scored (every answer unparsable, or no entries).",
    )
    p.add_argument("responses", metavar="RESPONSES.json",
                   help="JSON list of {instruction, input, output, model_response}")
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
    p.add_argument("--metrics-only", action="store_true",
                   help="skip the judge: report exact match and ROUGE-L only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_command)


def _run_command(args: argparse.Namespace, sleep: Callable[[float], None] = time.sleep) -> int:
    entries = load_responses(args.responses, args.response_key)
    template = DEFAULT_TEMPLATE
    if args.template:
        template = Path(args.template).read_text(encoding="utf-8")
        try:
            check_template(template)
        except ValueError as exc:
            raise ValueError(f"{args.template}: {exc}") from None
    records = None
    out = Path(args.out) if args.out else default_out(args.responses, args.model)
    # where the results go is checked before any request: a late write error would waste the judging
    for given, path in (("--out", None if args.metrics_only else out), ("--json", None if args.json in (None, "-") else Path(args.json))):
        if path is None:
            continue
        if path.is_dir():
            raise CLIError(f"{path}: is a directory; {given} is a file to write")
        check_writable(path)
    if not args.metrics_only:
        client = JudgeClient(host=args.host, model=args.model, api=args.api,
                             options={**DEFAULT_OPTIONS, **dict(args.option)}, timeout=args.timeout,
                             retries=args.retries, backoff=args.backoff, api_key=args.api_key,
                             sleep=sleep)
        try:
            records = run_judge(entries, client, out, response_key=args.response_key, template=template,
                                rescore_changed=args.rescore_changed, progress=not args.no_progress)
        except JudgeError as exc:
            raise CLIError(str(exc)) from None
    summary = summarize(entries, records, args.response_key)
    if args.json == "-":
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        if args.json:
            atomic_write_text(args.json, json.dumps(summary, indent=2) + "\n")
    if records is None and not entries:  # --metrics-only of nothing: as failed as a judge run of nothing
        print(f"jaxft judge: error: {args.responses} holds no entries", file=sys.stderr)
        return EXIT_FAILED
    if records is not None and summary["judge"]["num_scores"] == 0:
        # A run that produced no score at all is a failed run, not an average of nothing.
        print(f"jaxft judge: error: {nothing_scored(summary['judge'], args.responses, out)}", file=sys.stderr)
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
