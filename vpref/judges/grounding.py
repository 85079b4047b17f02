"""The grounding judge: how much the video's caption makes the answer more likely.

    PMI per token = ( log p(answer | caption, question) - log p(answer | question) ) / tokens

It needs no instruction following -- only a causal LM's likelihoods -- so it works with any
model (SmolLM2, the tiny models, a large model on vLLM).  An answer that states what the caption
says gains likelihood from it; one that contradicts the caption loses.  The overall score is the
PMI in nats per token (0 = the caption does not matter), not a 1-5 scale: set `pairs.min_margin`
on that scale (e.g. 0.05).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vpref.data.schema import Judgment, Verdict, judgment_id
from vpref.judges.base import ResponseView, SampleView

# plain text, no chat template: any causal LM reads it, a base model as well as an instruct one
WITH_CAPTION = "Video description: {caption}\nQuestion: {question}\nAnswer:"
WITHOUT_CAPTION = "Question: {question}\nAnswer:"
VERSION = "grounding@" + hashlib.sha1((WITH_CAPTION + WITHOUT_CAPTION).encode()).hexdigest()[:10]


class GroundingJudge:
    rubric = "grounding"
    rubric_version = VERSION

    def __init__(self, lm, actor: str = ""):
        if not hasattr(lm, "continuation_logprobs"):
            raise ValueError(f"{lm.path}: the grounding judge needs an engine that scores given text "
                             "(backend hf or vllm; a chat endpoint cannot)")
        self.lm, self.actor = lm, actor
        self.name = f"grounding:{Path(lm.path).name}"

    def _failed(self, sample: SampleView, r: ResponseView, error: str, failure: str) -> Judgment:
        return Judgment(judgment_id(r.response_id, self.name), r.response_id, sample.sample_id, self.name, self.rubric,
                        self.rubric_version, ok=False, error=error, failure=failure, judge_actor=self.actor,
                        path="likelihood")

    def pmi(self, sample: SampleView, texts: list[str]) -> list[tuple[float, float, int]]:
        """(mean log p with caption, mean log p without, answer tokens) per text."""
        items = [(WITH_CAPTION.format(caption=sample.caption, question=sample.question), " " + t) for t in texts]
        items += [(WITHOUT_CAPTION.format(question=sample.question), " " + t) for t in texts]
        lps = self.lm.continuation_logprobs(items)
        n = len(texts)
        return [(sum(w) / len(w), sum(wo) / len(w), len(w)) for w, wo in zip(lps[:n], lps[n:])]

    def score(self, sample: SampleView, responses: list[ResponseView]) -> list[Judgment]:
        if not sample.caption:
            return [self._failed(sample, r, "the grounding judge needs the video's caption", "no_context")
                    for r in responses]
        keep = [r for r in responses if r.text.strip()]
        got = dict(zip([r.response_id for r in keep], self.pmi(sample, [r.text for r in keep]))) if keep else {}
        out = []
        for r in responses:
            if r.response_id not in got:
                out.append(self._failed(sample, r, "empty answer: nothing to ground", "unparsed"))
                continue
            with_c, without_c, n = got[r.response_id]
            pmi = round(with_c - without_c, 6)
            out.append(Judgment(
                judgment_id(r.response_id, self.name), r.response_id, sample.sample_id, self.name, self.rubric,
                self.rubric_version, ok=True, overall=pmi,
                scores={"pmi": pmi, "logp_caption": round(with_c, 6), "logp_plain": round(without_c, 6),
                        "tokens": float(n)},
                judge_actor=self.actor, path="likelihood",
            ))
        return out

    def compare(self, sample: SampleView, first: ResponseView, second: ResponseView) -> Verdict:
        """The higher PMI wins in both orders (the score does not see an order); a tie or a failed
        score is inconsistent, so the pair is dropped."""
        a, b = self.score(sample, [first, second])
        ok = a.ok and b.ok
        first_wins = ok and a.overall > b.overall
        tie = ok and a.overall == b.overall
        wa = ("A" if first_wins or tie else "B") if ok else None
        wb = ("B" if first_wins else "A") if ok else None
        return Verdict(verdict_id="", sample_id=sample.sample_id, first_id=first.response_id,
                       second_id=second.response_id, winner_ab=wa, winner_ba=wb, ok=ok,
                       consistent=ok and not tie, error=None if ok else (a.error or b.error), judge=self.name,
                       judge_actor=self.actor, path="likelihood", failure="" if ok else (a.failure or b.failure))


def build(cfg, actor: str = ""):
    from vpref.judges.engines import make_engine

    return GroundingJudge(make_engine(cfg, require_chat=False), actor=actor)


def identity(cfg) -> tuple[str, str, str]:
    from vpref.judges.engines import model_name

    return f"grounding:{model_name(cfg.model)}", "grounding", VERSION
