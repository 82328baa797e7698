"""Read the 0..100 score out of an LLM judge's answer, or say there is none.

A score must be *stated*: the answer is the number ("85", "**85**", "85/100", "Score: 85"), a
line of it is, it is labelled ("My score is 40", "**Score:** 85", "Rating: 60."), given by the
judge ("I'd rate the response an 85"), or a fraction of 100 ("85 out of 100"). Numbers that only
occur in the text are not scores: those of the scale's description ("on a scale from 0 to 100,
where 100 is the best score", "a score out of 100"), of the prompt the judge echoes, or of its
explanation ("the response has 3 steps"). An answer is unparsed (None) when it is a refusal, is
on another scale ("8/10", "4 stars", "on a scale of 1 to 10"), states several different scores
or a range, or states a decimal or a value outside 0..100: an unparsed answer is counted and
reported, never turned into a number.
"""

from __future__ import annotations

import re

__all__ = ["parse_score"]

# An integer (sign kept, so "-5" is out of range) not part of a decimal or a longer number ("1,000").
_N = r"(?<![\d.])(?<!\d,)(-?\d{1,4})(?!\d|[.,]\d)"
_I = re.I

# The scale's own description (the reference's prompt says "on a scale from 0 to 100, where
# 100 is the best score"); removed before anything is read.
_SCALE_TEXT = [re.compile(p, _I) for p in (
    r"\b(?:on\s+)?(?:a|the)\s+(?:0\s*(?:-|–|to)\s*100\s+)?scale(?:\s+(?:of|from))?\s+0\s*(?:-|–|to)\s*100\b",
    r"\b(?:from|between|of)\s+0\s*(?:-|–|to|and)\s*100\b",
    r"\(\s*0\s*(?:-|–|to)\s*100\s*\)|(?<![\d.-])\b0\s*(?:-|–)\s*100\b(?!\s*[-–]?\d)",
    r"(?:\b(?:where|with|and)|[,(])\s*100\s+(?:is|being|means|represents|=)\s+(?:the\s+|a\s+)?"
    r"(?:best|perfect|highest|top|maximum)(?:\s+(?:possible\s+)?(?:score|rating|response))?",
    r"(?:\b(?:where|with|and)|[,(])\s*0\s+(?:is|being|means|represents|=)\s+(?:the\s+|a\s+)?"
    r"(?:worst|lowest|minimum)(?:\s+(?:possible\s+)?(?:score|rating|response))?",
)]
# "out of 100" / "/100" with no number before it ("a score out of 100") describes the scale.
_BARE_DENOMINATOR = re.compile(r"(\d\s*)?(?:\bout\s+of|/)\s*100\b", _I)

_REFUSAL = re.compile(
    r"\b(?:cannot|can\s*not|can[’']?t|unable\s+to|not\s+able\s+to|won[’']?t|will\s+not|refuse\s+to|"
    r"decline\s+to|impossible\s+(?:for\s+me\s+)?to|not\s+(?:possible|appropriate)\s+(?:for\s+me\s+)?to)"
    r"\s+(?!be\b)(?:[\w’']+\s+){0,3}?(?:score|rate|rating|grade|evaluate|assess|judge)\b", _I)

# Another scale: "scale of 1 to 10", "on a scale of 10", "a score out of 5", "4 stars".
_OTHER_SCALE = re.compile(
    r"\bscale\s+(?:of|from)\s+\d+\s*(?:-|–|to)\s*(\d+)|\bscale\s+of\s+(\d+)\b(?!\s*(?:-|–|to))|"
    r"(?<![\d\s])\s*\bout\s+of\s+(\d+)\b|\b\d+(?:\.\d+)?\s*(?:stars?|/\s*5\s*stars?)\b", _I)
# What may follow a stated score and makes it unreadable: another denominator, a range, stars.
_AFTER = re.compile(r"\s*(?:\(\s*)?(?:(?:/|\bout\s+of)\s*(\d+)|(?:-|–|\bto\b)\s*\d|stars?\b)", _I)

_UNIT = r"(?:[ \t]*(?:/[ \t]*100|out[ \t]+of[ \t]+100|%|points?))?"
# A line that is only a score ("85", "Score: 85/100.", "Final rating = 85 points").
# (Within one line, [ \t] not \s: a pattern that can start at every line must not span lines.)
_LINE = re.compile(rf"^[ \t]*(?:(?:(?:final|overall|my)[ \t]+)?(?:score|rating|grade)(?:[ \t]*[:=])?[ \t]*)?{_N}{_UNIT}"
                   r"(?:[ \t]*[.!])?[ \t]*$", _I | re.M)
# A labelled score: "Score: 85", "score of 85", "The score is: 78", "rating would be 60".
_LABEL = re.compile(
    rf"\b(?:score|rating|grade)\b(?:\s*[:=]|\s+[-–](?=\s)|\s+(?:is|of|would|will|be|a|an|i\s+give|given)\b)+\s*{_N}", _I)
# The judge gives it: "I'd rate the model response an 85", "I would give it a score of 75".
_GIVEN = re.compile(
    r"\bi(?:[’']d|[’']ll|\s+would|\s+will|\s+can|\s+must)?(?:\s+\w+ly)?\s+(?:give|rate|score|grade|assign|award)\b"
    rf"(?:\s+(?:it|this|that|the|model[’']?s?|response|answer|a|an|score|rating|grade|of|as)\b)*\s*{_N}", _I)
_FRACTION_100 = re.compile(rf"{_N}\s*(?:/|out\s+of)\s*100\b", _I)
# Last resort: the answer starts with a number that ends its sentence ("85. The response ...").
_LEADING = re.compile(rf"^\s*{_N}{_UNIT}\s*(?:[.:]\s|[-–]\s|\n|$)", _I)
_MARKUP = re.compile(r"[*_`#>|]")


def _without_echo(text: str, prompt: str) -> str:
    """`text` without the pieces of `prompt` it repeats: their numbers are the prompt's, not a
    score. Pieces: the whole prompt, its lines and quoted parts of 12 characters or more, and a
    quoted part of any length that the answer quotes too ("the response `42` is wrong") but is
    not all of."""
    pieces = {prompt.strip()} | {p.strip() for p in re.split(r"[`\n]", prompt)}
    quoted = {q for q in prompt.split("`")[1::2] if q.strip()}
    for piece in sorted((p for p in pieces if len(p) >= 12), key=len, reverse=True):
        text = text.replace(piece, " ")
    for piece in sorted(quoted, key=len, reverse=True):
        if text.strip().strip("`\"'") == piece:
            continue  # the whole answer: the judge's own (a response "85" scored "`85`")
        for mark in "`\"'":
            text = text.replace(f"{mark}{piece}{mark}", " ")
    return text


def parse_score(answer: str, prompt: str | None = None) -> int | None:
    """The 0..100 integer score a judge's answer states, or None when it states none.

    `prompt`: the scoring prompt the answer replies to; what the answer repeats of it is
    ignored (a judge that echoes the prompt has given no score).
    """
    text = _without_echo(answer, prompt) if prompt else answer
    text = _MARKUP.sub(" ", text)
    for pattern in _SCALE_TEXT:
        text = pattern.sub(" ", text)
    text = _BARE_DENOMINATOR.sub(lambda m: m.group(0) if m.group(1) else " ", text)
    if _REFUSAL.search(text):
        return None
    for match in _OTHER_SCALE.finditer(text):
        denominator = next((g for g in match.groups() if g), None)
        if denominator is None or int(denominator) != 100:
            return None
    found = [m for pattern in (_LINE, _LABEL, _GIVEN, _FRACTION_100) for m in pattern.finditer(text)]
    if not found:
        found = list(_LEADING.finditer(text))
    values = set()
    for match in found:
        after = _AFTER.match(text, match.end(1))
        if after and not (after.group(1) and int(after.group(1)) == 100):
            return None  # "8/10", "85-90", "8.5", "4 stars": not a score on this scale
        values.add(int(match.group(1)))
    if len(values) != 1:
        return None  # none, or several different ones
    (value,) = values
    return value if 0 <= value <= 100 else None
