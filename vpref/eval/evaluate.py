"""Evaluation of a policy on a held-out split: exact-match accuracy per question family, the
build judge's rubric scores, answer lengths, each mean with a bootstrap 95% interval.

Each metric is one function of the evaluation records, listed in METRICS.  The papers' judged
benchmarks (Video-ChatGPT's five dimensions, zero-shot QA, caption-grounded scoring, the win rate)
are the suites in `vpref.eval.suites`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vpref.data.manifest import Sample
from vpref.data.schema import Judgment
from vpref.data.world import FAMILIES, is_correct, words
from vpref.eval import stats
from vpref.eval.qa import accuracy_by_family
from vpref.models.generation import Completion


@dataclass
class EvalRecord:
    sample: Sample
    answer: Completion
    judgment: Judgment


def exact_match(records: list[EvalRecord]) -> dict:
    samples, texts = [r.sample for r in records], [r.answer.text for r in records]
    acc = accuracy_by_family(samples, texts)
    hits = [(s.family, is_correct(s.family, t, s.answer)) for s, t in zip(samples, texts)
            if s.answer is not None and s.family in FAMILIES]
    ci = {}
    for i, key in enumerate(acc):
        x = [float(ok) for f, ok in hits if key == "all" or f == key or (key == "qa" and f != "describe")]
        ci[key] = stats.mean(x, seed=i).to_json()["ci95"]
    return {"accuracy": acc, "accuracy_ci95": ci}


def judge_scores(records: list[EvalRecord]) -> dict:
    ok = [r.judgment for r in records if r.judgment.ok]
    aspects = sorted({a for j in ok for a in j.scores})
    return {
        "judge": {
            "name": records[0].judgment.judge if records else None,
            "rubric_version": records[0].judgment.rubric_version if records else None,
            "overall": float(np.mean([j.overall for j in ok])) if ok else None,
            "overall_ci95": stats.mean([j.overall for j in ok]).to_json()["ci95"] if ok else [None, None],
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
