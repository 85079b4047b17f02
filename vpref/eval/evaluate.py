"""Evaluation of a policy on a held-out split: exact-match accuracy per question family, the
judge's rubric scores, answer lengths.

Each metric is one function of the evaluation records, listed in METRICS; Video-ChatGPT's five
judge dimensions or zero-shot QA judging plug in as further functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vpref.data.manifest import Sample
from vpref.data.schema import Judgment
from vpref.data.world import words
from vpref.eval.qa import accuracy_by_family
from vpref.models.generation import Completion


@dataclass
class EvalRecord:
    sample: Sample
    answer: Completion
    judgment: Judgment


def exact_match(records: list[EvalRecord]) -> dict:
    return {"accuracy": accuracy_by_family([r.sample for r in records], [r.answer.text for r in records])}


def judge_scores(records: list[EvalRecord]) -> dict:
    ok = [r.judgment for r in records if r.judgment.ok]
    aspects = sorted({a for j in ok for a in j.scores})
    return {
        "judge": {
            "name": records[0].judgment.judge if records else None,
            "rubric_version": records[0].judgment.rubric_version if records else None,
            "overall": float(np.mean([j.overall for j in ok])) if ok else None,
            "aspects": {a: float(np.mean([j.scores[a] for j in ok])) for a in aspects},
            "failures": len(records) - len(ok),
        }
    }


def answer_length(records: list[EvalRecord]) -> dict:
    return {"length": {"tokens": float(np.mean([r.answer.num_tokens for r in records])) if records else 0.0,
                       "words": float(np.mean([len(words(r.answer.text)) for r in records])) if records else 0.0,
                       "truncated": sum(r.answer.finish_reason == "length" for r in records)}}


METRICS = [exact_match, judge_scores, answer_length]


def compute_metrics(records: list[EvalRecord]) -> dict:
    out = {"questions": len(records)}
    for fn in METRICS:
        out.update(fn(records))
    return out
