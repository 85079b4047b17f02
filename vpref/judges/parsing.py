"""Parsing judge answers: the one place where judge text becomes numbers.

Strict on purpose: every aspect must appear exactly once with a whole number inside the scale,
or the answer is rejected with a reason (the caller retries, then records a failure).  Lenient
only on presentation -- case, markdown bold, a trailing "/5".
"""

from __future__ import annotations

import re


class JudgeParseError(ValueError):
    """A judge answer that does not follow the rubric's output format; the message says how."""


_LINE = re.compile(r"^\s*[*_#\-\s]*([A-Za-z][A-Za-z _-]*?)[*_\s]*[:=]\s*[*_]*\s*(.*?)\s*$")
_WINNER = re.compile(r"^[*_\s]*(?:answer\s+)?\(?([ab])\)?[*_.\s]*$", re.IGNORECASE)
_NUMBER = re.compile(r"^(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?[*_.\s]*$")


def _fields(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            found.setdefault(m.group(1).strip().lower().replace("-", " ").replace("_", " "), []).append(m.group(2))
    return found


def parse_scores(text: str, aspects: tuple[str, ...], scale: tuple[int, int] = (1, 5)) -> tuple[dict[str, int], str]:
    """`Aspect: N` lines -> ({aspect: N}, rationale).  Raises JudgeParseError naming the problem."""
    if not text or not text.strip():
        raise JudgeParseError("empty answer")
    found = _fields(text)
    lo, hi = scale
    scores = {}
    for aspect in aspects:
        values = found.get(aspect.lower())
        if not values:
            raise JudgeParseError(f"no '{aspect.capitalize()}: <{lo}-{hi}>' line")
        nums = []
        for v in values:
            m = _NUMBER.match(v)
            if not m:
                raise JudgeParseError(f"'{aspect}' is {v[:40]!r}, not a whole number {lo}-{hi}")
            nums.append(float(m.group(1)))
        if len(set(nums)) > 1:
            raise JudgeParseError(f"'{aspect}' is given {len(nums)} different scores {nums}")
        x = nums[0]
        if x != int(x) or not lo <= x <= hi:
            raise JudgeParseError(f"'{aspect}' score {x:g} is outside the whole numbers {lo}-{hi}")
        scores[aspect] = int(x)
    rationale = (found.get("rationale") or [""])[0]
    return scores, rationale


def parse_winner(text: str) -> tuple[str, str]:
    """`Winner: A|B` -> ("A"|"B", rationale).  Raises JudgeParseError naming the problem."""
    if not text or not text.strip():
        raise JudgeParseError("empty answer")
    found = _fields(text)
    values = found.get("winner")
    if not values:
        raise JudgeParseError("no 'Winner: <A or B>' line")
    picks = set()
    for v in values:
        m = _WINNER.match(v)
        if not m:
            raise JudgeParseError(f"winner must be A or B, got {v[:40]!r}")
        picks.add(m.group(1).upper())
    if len(picks) != 1:
        raise JudgeParseError(f"winner must be one of A or B, got {sorted(picks)}")
    return picks.pop(), (found.get("rationale") or [""])[0]


def parse_label(text: str, labels) -> str:
    """The label a reply gives where its header ends ("Relevance: 4", "{'score': 3}"): the text must
    start with one of the labels, followed by nothing that would make it another word or number.
    Lenient only on presentation (spaces, markdown, quotes, a trailing "/5" or full stop)."""
    s = (text or "").lstrip(" \t*_\"'`([")
    for lbl in sorted(labels, key=len, reverse=True):
        if s.startswith(lbl):
            rest = s[len(lbl):]
            if not rest or not (rest[0].isalnum() or (rest[0] == "." and rest[1:2].isdigit())):
                return lbl
    shown = s.splitlines()[0][:40] if s.strip() else "nothing"
    raise JudgeParseError(f"{shown!r} is not one of the labels {', '.join(labels)}")
