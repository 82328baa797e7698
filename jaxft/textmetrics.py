"""Offline text metrics that need no judge: exact match and ROUGE-L.

Exact match compares the two texts after a light normalisation: Unicode case folding, every
run of whitespace collapsed to one space, leading/trailing whitespace removed. Punctuation is
kept ("Jane Austen." and "Jane Austen" differ), so the metric stays strict.

ROUGE-L is the F1 of the longest common subsequence of tokens. Tokenisation follows the
`rouge-score` package's default (no stemming): lower-case, replace every run of characters
outside ``[a-z0-9]`` by a space, split on whitespace. The tests check this module against
`rouge-score` on real responses; it is plain Python so the runtime needs no extra package.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
_WHITESPACE = re.compile(r"\s+")


class RougeScore(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


def normalize_for_exact_match(text: str) -> str:
    """Case-fold, collapse whitespace runs to one space, strip the ends."""
    return _WHITESPACE.sub(" ", text.casefold()).strip()


def exact_match(reference: str, candidate: str) -> bool:
    """True when both texts are equal after `normalize_for_exact_match`."""
    return normalize_for_exact_match(reference) == normalize_for_exact_match(candidate)


def rouge_tokenize(text: str) -> list[str]:
    """Tokens as rouge-score's default tokenizer makes them (lower-case ASCII alphanumerics)."""
    return _NON_ALPHANUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a)*len(b)) time)."""
    if len(a) < len(b):  # keep the DP row as short as possible
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            if item == other:
                current.append(previous[j - 1] + 1)
            else:
                current.append(max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(reference: str, candidate: str) -> RougeScore:
    """ROUGE-L precision, recall and F1 of `candidate` against `reference`.

    Zero when either text has no tokens (as rouge-score does).
    """
    ref_tokens, cand_tokens = rouge_tokenize(reference), rouge_tokenize(candidate)
    if not ref_tokens or not cand_tokens:
        return RougeScore(0.0, 0.0, 0.0)
    lcs = lcs_length(ref_tokens, cand_tokens)
    precision = lcs / len(cand_tokens)
    recall = lcs / len(ref_tokens)
    if precision + recall == 0:
        return RougeScore(precision, recall, 0.0)
    return RougeScore(precision, recall, 2 * precision * recall / (precision + recall))


def corpus_metrics(references: Sequence[str], candidates: Sequence[str]) -> dict:
    """Exact-match count/rate and mean ROUGE-L (precision, recall, F1) over paired texts."""
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
    n = len(references)
    matches = sum(exact_match(r, c) for r, c in zip(references, candidates))
    scores = [rouge_l(r, c) for r, c in zip(references, candidates)]

    def mean(values: list[float]) -> float | None:
        return sum(values) / n if n else None

    return {
        "count": n,
        "exact_match": matches,
        "exact_match_rate": matches / n if n else None,
        "rouge_l_precision": mean([s.precision for s in scores]),
        "rouge_l_recall": mean([s.recall for s in scores]),
        "rouge_l_f1": mean([s.fmeasure for s in scores]),
        "rouge_l_f1_per_entry": [s.fmeasure for s in scores],
    }
