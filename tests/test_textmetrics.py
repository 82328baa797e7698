"""Exact match and ROUGE-L (jaxft.textmetrics), checked by hand and against rouge-score."""

from __future__ import annotations

import json

import pytest

from jaxft.textmetrics import (
    corpus_metrics,
    exact_match,
    lcs_length,
    normalize_for_exact_match,
    rouge_l,
    rouge_tokenize,
)


@pytest.fixture(scope="module")
def responses(shared_data):
    return json.loads((shared_data / "instruction-data-with-response.json").read_text(encoding="utf-8"))


def test_exact_match_normalises_case_and_whitespace_only():
    assert normalize_for_exact_match("  Jane\t AUSTEN \n") == "jane austen"
    assert exact_match("Jane Austen.", "  jane   austen.\n")
    assert not exact_match("Jane Austen.", "Jane Austen")  # punctuation is kept
    assert exact_match("STRASSE", "straße")  # case folding, not just lower()
    assert not exact_match("a b", "ab")


def test_rouge_tokenize_matches_rouge_score_rules():
    assert rouge_tokenize("The car's speed: 100km/h!") == ["the", "car", "s", "speed", "100km", "h"]
    assert rouge_tokenize("Café NAÏVE") == ["caf", "na", "ve"]  # non-ASCII letters split words
    assert rouge_tokenize("  ...  ") == []


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("", "", 0),
        ("abc", "", 0),
        ("abc", "abc", 3),
        ("abcbdab", "bdcaba", 4),  # the textbook example (e.g. "bcba")
        ("xyz", "abc", 0),
        ("axbycz", "abc", 3),
    ],
)
def test_lcs_length(a, b, expected):
    assert lcs_length(list(a), list(b)) == expected
    assert lcs_length(list(b), list(a)) == expected


def test_rouge_l_by_hand():
    assert rouge_l("the cat sat", "the cat sat").fmeasure == 1.0
    assert rouge_l("the cat sat", "dogs run").fmeasure == 0.0
    assert rouge_l("", "anything") == (0.0, 0.0, 0.0)
    # LCS "the cat on the mat" = 5 of 6 reference tokens and 5 of 7 candidate tokens.
    score = rouge_l("the cat sat on the mat", "the cat was found on the mat")
    assert score.recall == pytest.approx(5 / 6)
    assert score.precision == pytest.approx(5 / 7)
    assert score.fmeasure == pytest.approx(2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7))


def test_rouge_l_equals_rouge_score_on_real_responses(responses):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert len(responses) == 110
    for entry in responses:
        theirs = scorer.score(entry["output"], entry["model_response"])["rougeL"]
        ours = rouge_l(entry["output"], entry["model_response"])
        assert ours.precision == pytest.approx(theirs.precision, abs=1e-12)
        assert ours.recall == pytest.approx(theirs.recall, abs=1e-12)
        assert ours.fmeasure == pytest.approx(theirs.fmeasure, abs=1e-12)


def test_corpus_metrics_on_real_responses(responses):
    refs = [e["output"] for e in responses]
    cands = [e["model_response"] for e in responses]
    metrics = corpus_metrics(refs, cands)
    assert metrics["count"] == 110
    expected_matches = sum(r.strip().lower() == c.strip().lower() for r, c in zip(refs, cands))
    assert metrics["exact_match"] == expected_matches > 0
    assert metrics["exact_match_rate"] == pytest.approx(expected_matches / 110)
    per_entry = metrics["rouge_l_f1_per_entry"]
    assert metrics["rouge_l_f1"] == pytest.approx(sum(per_entry) / 110)
    assert 0.0 < metrics["rouge_l_f1"] < 1.0
    # An exact match is a perfect ROUGE-L (the tokenizer drops case and punctuation).
    assert all(f == 1.0 for r, c, f in zip(refs, cands, per_entry) if exact_match(r, c))


def test_corpus_metrics_checks_lengths():
    with pytest.raises(ValueError, match="2 references but 1 candidates"):
        corpus_metrics(["a", "b"], ["a"])
    assert corpus_metrics([], [])["rouge_l_f1"] is None
