"""The context-aware reference judge of the synthetic world.

Like VLM-RLAIF's judge it sees the video only through a detailed caption (plus the reference
answer when the manifest has one), and it scores each answer on rubric aspects, each 1-5:

* correctness  -- the value the question asks for matches the reference answer
* detail       -- coverage: the answer states the caption's facts that the question is about
* faithfulness -- no facts the caption does not support (hallucinated shapes, colours, motions)
* concision    -- about as long as the reference answer, no repetition

The overall score is a fixed weighted mean.  Deterministic: the same inputs, the same judgment.
It reads text with the world's own grammar (`vpref.data.world`), so it works on any manifest
whose captions are written in that grammar.
"""

from __future__ import annotations

import hashlib
import inspect
from collections import Counter

from vpref.data.schema import Judgment, Verdict, judgment_id
from vpref.data.world import COLOURS, SHAPES, extract_value, parse_facts, words
from vpref.judges.base import ResponseView, SampleView

ASPECTS = ("correctness", "detail", "faithfulness", "concision")
WEIGHTS = {"correctness": 0.4, "detail": 0.2, "faithfulness": 0.3, "concision": 0.1}


def _scale(fraction: float) -> int:
    return 1 + round(4 * max(0.0, min(1.0, fraction)))


def _facts_about(facts: frozenset, names: set[tuple[str, str]]) -> frozenset:
    return frozenset(f for f in facts if f[0] == "count" or (f[1], f[2]) in names)


class ReferenceJudge:
    name = "reference"
    rubric = "reference"

    def __init__(self, actor: str = ""):
        self.actor = actor
        src = inspect.getsource(ReferenceJudge) + repr(WEIGHTS)
        self.rubric_version = "reference@" + hashlib.sha1(src.encode()).hexdigest()[:10]

    # ------------------------------------------------------------------ aspects

    def aspects(self, sample: SampleView, text: str) -> dict[str, int]:
        truth = parse_facts(sample.caption or "")
        claimed = parse_facts(text)
        w = words(text)
        family = sample.family
        ref = sample.answer

        # correctness: the asked value, or (no reference / describe) the F1 of the stated facts --
        # precision alone would reward saying one safe fact and nothing else
        if ref and family and family != "describe":
            got, want = extract_value(family, text), extract_value(family, ref)
            correctness = 5 if got is not None and got == want else (2 if got is None else 1)
        else:
            hit = len(claimed & truth)
            f1 = 2 * hit / (len(claimed) + len(truth)) if claimed and truth else 0.0
            correctness = _scale(f1) if claimed else 1

        # detail: coverage of the caption's facts relevant to the question (a row without a family
        # -- a manifest that is not the synthetic world's -- is judged as open-ended)
        if family in (None, "describe") or not ref:
            detail = _scale(len(claimed & truth) / len(truth)) if truth else 3
        else:
            subject = {x for x in words(ref) if x in COLOURS or x in SHAPES}
            gives_value = extract_value(family, text) is not None
            names_subject = bool(subject) and subject <= set(w)
            detail = 5 if gives_value and names_subject else (3 if gives_value else 1)

        # faithfulness: penalise every claim the caption does not support
        seen_colours = {f[1] for f in truth if f[0] == "object"}
        seen_shapes = {f[2] for f in truth if f[0] == "object"}
        unsupported = len(claimed - truth)
        unsupported += len({x for x in w if x in COLOURS} - seen_colours)
        unsupported += len({x for x in w if x in SHAPES} - seen_shapes)
        faithfulness = max(1, 5 - 2 * unsupported)

        # concision: length against the reference (or the caption), minus repetition
        target = len(words(ref or sample.caption or "")) or 8
        ratio = len(w) / target if w else 99.0
        concision = 5 if ratio <= 1.3 else 4 if ratio <= 1.8 else 3 if ratio <= 2.5 else 2 if ratio <= 4 else 1
        # repetition: a word pair used more often than the reference itself uses it, plus one
        allowed = Counter(zip(words(ref or sample.caption or ""), words(ref or sample.caption or "")[1:]))
        if any(n > allowed.get(bigram, 0) + 1 for bigram, n in Counter(zip(w, w[1:])).items()):
            concision = max(1, concision - 2)
        if not w:  # saying nothing is the worst answer, not a faithful one
            correctness = detail = faithfulness = concision = 1
        return {"correctness": correctness, "detail": detail, "faithfulness": faithfulness, "concision": concision}

    @staticmethod
    def overall(scores: dict[str, int]) -> float:
        return round(sum(WEIGHTS[a] * scores[a] for a in ASPECTS), 4)

    # ------------------------------------------------------------------ the Judge interface

    def score(self, sample: SampleView, responses: list[ResponseView]) -> list[Judgment]:
        out = []
        for r in responses:
            if sample.caption is None and sample.answer is None:
                out.append(self._failed(sample, r, "the reference judge needs a caption or a reference answer"))
                continue
            s = self.aspects(sample, r.text)
            out.append(Judgment(
                judgment_id=judgment_id(r.response_id, self.name), response_id=r.response_id,
                sample_id=sample.sample_id, judge=self.name, rubric=self.rubric,
                rubric_version=self.rubric_version, ok=True, scores=s, overall=self.overall(s),
                rationale=", ".join(f"{a} {v}" for a, v in s.items()), judge_actor=self.actor, path="reference",
            ))
        return out

    def _failed(self, sample, r, error) -> Judgment:
        return Judgment(judgment_id(r.response_id, self.name), r.response_id, sample.sample_id, self.name,
                        self.rubric, self.rubric_version, ok=False, error=error, judge_actor=self.actor,
                        path="reference", failure="no_context")

    def compare(self, sample: SampleView, first: ResponseView, second: ResponseView) -> Verdict:
        """Pick the higher overall score in each order; a tie goes to position A, so ties come
        out inconsistent and are dropped (what position bias looks like)."""

        def winner(a: ResponseView, b: ResponseView) -> str:
            sa, sb = self.overall(self.aspects(sample, a.text)), self.overall(self.aspects(sample, b.text))
            return "B" if sb > sa else "A"

        ab, ba = winner(first, second), winner(second, first)
        return Verdict(
            verdict_id="", sample_id=sample.sample_id, first_id=first.response_id, second_id=second.response_id,
            winner_ab=ab, winner_ba=ba, ok=True, consistent=(ab == "A") != (ba == "A"), judge=self.name,
            judge_actor=self.actor, path="reference",
        )


def build(cfg, actor: str = ""):
    return ReferenceJudge(actor=actor)


def identity(cfg) -> tuple[str, str, str]:
    j = ReferenceJudge()
    return j.name, j.rubric, j.rubric_version
