"""The reference judge of the evaluation suites: each protocol's dimension, deterministically, on
the synthetic world's language (`vpref.data.world`).

It sees what the protocol's judge sees (Video-ChatGPT: question, correct answer, prediction;
LLaVA-Hound and the win rate: also the caption) and answers in the protocol's own value format,
so its judgments go through the same aggregation as an LLM's.  It reads text with the world's
grammar, so it is the judge of the synthetic world only: on a real benchmark it would find no
facts to compare.

Rules (a QA item is one of the world's short-answer families; everything else, describe
included, is judged on the facts it states):

* correctness (0-5): QA -- the asked value matches 5, a wrong value 0, no single value 1;
  facts -- int(5 * F0.5) of the stated facts against the answer's (precision-weighted: stating
  wrong facts costs more than leaving facts out).
* detail (0-5): QA -- a value naming the question's subject 5, a bare value 3, none 0; facts --
  int(5 * recall) of the answer's facts.
* context (0-5): int(5 * share of the colours, shapes and numbers the prediction names that the
  question or answer also name); a prediction naming none: 1 (0 when empty).
* temporal (0-5): QA (order, direction) as correctness; facts -- int(5 * Jaccard) of the order and
  motion facts.
* consistency (0-5): QA -- both answers right 5, exactly one right 2, both agreeing on a wrong
  value 1, else 0; facts -- int(5 * min(J(a1, ref), J(a2, ref), J(a1, a2))).
* zero-shot: 'yes' when the asked value matches (facts: the same fact set); score as correctness.
* grounded (1-5, against the caption): QA -- right 5, minus 1 per colour or shape the caption
  does not have (not below 3); wrong 1; no value 2; facts -- 1 + int(4 * F1) against the caption.
* pairwise: the answer of higher grounded quality wins (a continuous version of the grounded
  rule); equal quality is a tie.  Position and length play no part, so both orders agree.
"""

from __future__ import annotations

import hashlib
import inspect
import sys

from vpref.data.world import COLOURS, FAMILIES, NUMBERS, SHAPES, extract_value, parse_facts, words

QA_FAMILIES = tuple(f for f in FAMILIES if f != "describe")
_ENTITY = set(COLOURS) | set(SHAPES) | set(NUMBERS.values())


def _qa(item: dict) -> str | None:
    fam = item.get("family")
    return fam if fam in QA_FAMILIES else None


def _value_score(fam: str, pred: str, ref: str) -> int:
    got, want = extract_value(fam, pred), extract_value(fam, ref)
    if got is None:
        return 1
    return 5 if got == want else 0


def _prf(claimed: frozenset, truth: frozenset) -> tuple[float, float]:
    hit = len(claimed & truth)
    return (hit / len(claimed) if claimed else 0.0), (hit / len(truth) if truth else 0.0)


def _jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _unsupported_words(text: str, caption: str) -> int:
    truth = parse_facts(caption)
    colours = {f[1] for f in truth if f[0] == "object"}
    shapes = {f[2] for f in truth if f[0] == "object"}
    w = set(words(text))
    return len((w & set(COLOURS)) - colours) + len((w & set(SHAPES)) - shapes)


def correctness(item: dict) -> dict:
    pred, ref = item["prediction"], item["answer"]
    if (fam := _qa(item)):
        return {"score": _value_score(fam, pred, ref)}
    p, r = _prf(parse_facts(pred), parse_facts(ref))
    f05 = 1.25 * p * r / (0.25 * p + r) if p + r > 0 else 0.0
    return {"score": int(5 * f05)}


def detail(item: dict) -> dict:
    pred, ref = item["prediction"], item["answer"]
    if (fam := _qa(item)):
        if extract_value(fam, pred) is None:
            return {"score": 0}
        subject = {w for w in words(item["question"]) if w in COLOURS or w in SHAPES}
        return {"score": 5 if subject <= set(words(pred)) else 3}
    return {"score": int(5 * _prf(parse_facts(pred), parse_facts(ref))[1])}


def context(item: dict) -> dict:
    named = set(words(item["prediction"])) & _ENTITY
    if not named:
        return {"score": 1 if words(item["prediction"]) else 0}
    scene = set(words(item["question"] + " " + item["answer"])) & _ENTITY
    return {"score": int(5 * len(named & scene) / len(named))}


def _temporal_facts(text: str) -> frozenset:
    return frozenset(f for f in parse_facts(text) if f[0] in ("order", "motion"))


def temporal(item: dict) -> dict:
    pred, ref = item["prediction"], item["answer"]
    if (fam := _qa(item)):
        return {"score": _value_score(fam, pred, ref)}
    return {"score": int(5 * _jaccard(_temporal_facts(pred), _temporal_facts(ref)))}


def consistency(item: dict) -> dict:
    p1, p2, ref = item["prediction1"], item["prediction2"], item["answer"]
    if (fam := _qa(item)):
        v1, v2, want = extract_value(fam, p1), extract_value(fam, p2), extract_value(fam, ref)
        right = (v1 == want and v1 is not None) + (v2 == want and v2 is not None)
        if right == 2:
            return {"score": 5}
        if right == 1:
            return {"score": 2}
        return {"score": 1 if v1 is not None and v1 == v2 else 0}
    f1, f2, r = parse_facts(p1), parse_facts(p2), parse_facts(ref)
    return {"score": int(5 * min(_jaccard(f1, r), _jaccard(f2, r), _jaccard(f1, f2)))}


def zeroshot(item: dict) -> dict:
    pred, ref = item["prediction"], item["answer"]
    if (fam := _qa(item)):
        got, want = extract_value(fam, pred), extract_value(fam, ref)
        return {"pred": "yes" if got is not None and got == want else "no", "score": _value_score(fam, pred, ref)}
    same = bool(parse_facts(pred)) and parse_facts(pred) == parse_facts(ref)
    return {"pred": "yes" if same else "no", "score": correctness(item)["score"]}


def _quality(text: str, item: dict) -> float:
    """Grounded quality in [0, 1] of one answer (what the pairwise rule compares)."""
    caption = item["caption"]
    if (fam := _qa(item)):
        got, want = extract_value(fam, text), extract_value(fam, item["answer"])
        if got is None:
            return 0.25
        return max(0.5, 1.0 - 0.125 * _unsupported_words(text, caption)) if got == want else 0.0
    claimed, truth = parse_facts(text), parse_facts(caption)
    p, r = _prf(claimed, truth)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def grounded(item: dict) -> dict:
    pred = " ".join(item["prediction"].split()[:256])  # the protocol's cut
    if (fam := _qa(item)):
        got, want = extract_value(fam, pred), extract_value(fam, item["answer"])
        if got is None:
            return {"score": 2.0, "how": "reference"}
        if got != want:
            return {"score": 1.0, "how": "reference"}
        return {"score": float(max(3, 5 - _unsupported_words(pred, item["caption"]))), "how": "reference"}
    return {"score": float(1 + int(4 * _quality(pred, item))), "how": "reference"}


def pairwise(item: dict) -> dict:
    a, b = _quality(item["response_a"], item), _quality(item["response_b"], item)
    return {"winner": "A" if a > b + 1e-9 else ("B" if b > a + 1e-9 else "tie")}


RULES = {
    "vcgpt_correctness": correctness,
    "vcgpt_detail": detail,
    "vcgpt_context": context,
    "vcgpt_temporal": temporal,
    "vcgpt_consistency": consistency,
    "zeroshot_qa": zeroshot,
    "grounded_hound": grounded,
    "winrate_pairwise": pairwise,
}

VERSION = "reference-dims@" + hashlib.sha1(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:10]
