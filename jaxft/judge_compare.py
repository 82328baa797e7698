"""Compare two responses files judged on the same entries (`jaxft judge --compare A B`).

Typically a tuned policy's responses (A) against its reference model's (B) on the same test
split. Each file is judged as `jaxft judge` judges one (its own score file, its own summary);
the comparison adds both average scores and A's win rate over B: over the entries scored in
both files, a win counts 1, a tie (equal scores) counts 1/2, a loss 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TIE_WEIGHT", "check_same_entries", "compare_summaries", "format_comparison"]

TIE_WEIGHT = 0.5  # what a tie adds to the wins in the win rate


def check_same_entries(
    a: Sequence[Mapping[str, str]], b: Sequence[Mapping[str, str]],
    a_path: str | os.PathLike, b_path: str | os.PathLike,
) -> None:
    """Raise ValueError unless `a` and `b` hold the same entries (instruction, input and
    output, in the same order): a win rate over different entries would mean nothing."""
    if len(a) != len(b):
        raise ValueError(f"--compare: {a_path} has {len(a)} entries, {b_path} has {len(b)}: "
                         "not responses to the same entries")
    for i, (x, y) in enumerate(zip(a, b)):
        for key in ("instruction", "input", "output"):
            if x.get(key, "") != y.get(key, ""):
                raise ValueError(f"--compare: entry {i} has another '{key}' in {b_path} than in {a_path}: "
                                 "not responses to the same entries")


def compare_summaries(summary_a: Mapping[str, Any], summary_b: Mapping[str, Any]) -> dict[str, Any]:
    """Both average scores and A's win rate over B from two `jaxft.judge.summarize` results."""
    wins = ties = losses = 0
    unpaired: list[int] = []
    outcomes: list[dict[str, Any]] = []
    for row_a, row_b in zip(summary_a["per_entry"], summary_b["per_entry"]):
        score_a, score_b = row_a["score"], row_b["score"]
        if score_a is None or score_b is None:
            unpaired.append(row_a["index"])
            outcome = None
        elif score_a > score_b:
            wins, outcome = wins + 1, "win"
        elif score_a == score_b:
            ties, outcome = ties + 1, "tie"
        else:
            losses, outcome = losses + 1, "loss"
        outcomes.append({"index": row_a["index"], "score_a": score_a, "score_b": score_b, "outcome": outcome})
    pairs = wins + ties + losses
    return {
        "average_a": summary_a["judge"]["average"],
        "average_b": summary_b["judge"]["average"],
        "num_scores_a": summary_a["judge"]["num_scores"],
        "num_scores_b": summary_b["judge"]["num_scores"],
        "pairs": pairs,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "tie_weight": TIE_WEIGHT,
        "win_rate": (wins + TIE_WEIGHT * ties) / pairs if pairs else None,
        "unpaired": unpaired,
        "per_entry": outcomes,
    }


def format_comparison(a_path: str | os.PathLike, b_path: str | os.PathLike, comparison: Mapping[str, Any]) -> str:
    """The comparison's text report (after each file's own report)."""
    def average(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "n/a"

    c = comparison
    lines = [f"A: {a_path}", f"B: {b_path}",
             f"Average score: A {average(c['average_a'])} ({c['num_scores_a']} scores), "
             f"B {average(c['average_b'])} ({c['num_scores_b']} scores)"]
    if c["win_rate"] is None:
        lines.append("Win rate of A over B: n/a (no entry is scored in both)")
    else:
        lines.append(f"Win rate of A over B: {100 * c['win_rate']:.1f}% ({c['wins']} wins, {c['ties']} ties "
                     f"counted as half, {c['losses']} losses; {c['pairs']} entries scored in both)")
    if c["unpaired"]:
        lines.append(f"Not compared: {len(c['unpaired'])} entries without a score in A or B")
    return "\n".join(lines)
