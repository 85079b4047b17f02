"""An LLM judge: rubric templates filled with the video's detailed caption as context.

Distributional by default (G-Eval; Wang et al. 2025): the reply is prefilled up to each aspect's
score ("Relevance: "), the score is the probability-weighted mean over the scale's labels,
renormalised over the labels, and each judgment keeps per aspect the distribution, the label mass
and the expected score.  A reply whose label mass is below `min_label_mass` is a failed judgment
with its reason.  Pairwise comparison reads the verdict labels' probabilities in both orders and
symmetrises them.  An optional rationale is generated after the scores, never before them.

`mode="text"` is the free-text path: generate the whole reply and parse it strictly, retrying
(greedy first, then sampled) a bounded number of times, then a failure record with the raw text.
Endpoints that return no log-probs fall back to strict parsing inside the engine; every judgment
records which path produced it.
"""

from __future__ import annotations

from pathlib import Path

from vpref.data.schema import Judgment, Verdict, judgment_id
from vpref.judges.base import ResponseView, SampleView
from vpref.judges.parsing import JudgeParseError, parse_scores, parse_winner
from vpref.judges.rubric import (PAIRWISE_LABELS, PAIRWISE_PREFILL, RATIONALE_HEADER, load_rubric, pairwise_version,
                                 render_pairwise)
from vpref.judges.scoring import Chain, LabelDist, LabelQuery, Usage, label_chains, label_distributions

NO_CONTEXT = "(no description available)"


def usage_fields(usage: Usage) -> dict:
    return dict(requests=usage.requests, cache_hit=usage.cache_hits > 0 and usage.requests == 0,
                input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                cost_usd=round(usage.cost_usd, 8))


def _paths(dists: list[LabelDist]) -> str:
    return ",".join(sorted({d.path for d in dists}))


class LLMJudge:
    def __init__(self, lm, rubric: str = "mmaipv", show_reference: bool = True, max_parse_retries: int = 2,
                 max_new_tokens: int = 64, retry_temperature: float = 0.7, actor: str = "",
                 mode: str = "distribution", min_label_mass: float = 0.25, rationale: bool = False):
        self.lm = lm
        self.spec = load_rubric(rubric)
        self.rubric, self.rubric_version = self.spec.name, self.spec.version
        self.name = f"llm:{Path(lm.path).name}"
        self.show_reference = show_reference
        self.max_parse_retries = max_parse_retries
        self.max_new_tokens = max_new_tokens
        self.retry_temperature = retry_temperature
        self.actor = actor
        if mode not in ("distribution", "text"):
            raise ValueError(f"unknown LLM judge mode {mode!r}; use distribution or text")
        if mode == "distribution" and not hasattr(lm, "label_logprobs"):
            raise ValueError(f"{lm.path}: this engine cannot score labels; use judge.mode: text")
        self.mode, self.min_label_mass, self.rationale = mode, min_label_mass, rationale

    def _context(self, sample: SampleView) -> dict:
        return dict(question=sample.question, context=sample.caption or NO_CONTEXT,
                    reference=sample.answer if self.show_reference else None)

    def _base(self, sample: SampleView, r: ResponseView, **kw) -> dict:
        return dict(judgment_id=judgment_id(r.response_id, self.name), response_id=r.response_id,
                    sample_id=sample.sample_id, judge=self.name, rubric=self.rubric,
                    rubric_version=self.rubric_version, judge_actor=self.actor, **kw)

    # ------------------------------------------------------------------ pointwise

    def score(self, sample: SampleView, responses: list[ResponseView]) -> list[Judgment]:
        if self.mode == "text":
            return self._score_text(sample, responses)
        ctx = self._context(sample)
        prompts = [self.spec.render(response=r.text, **ctx) for r in responses]
        steps = self.spec.steps()
        results = label_chains(self.lm, [Chain(p, steps, self.rubric_version) for p in prompts], self.min_label_mass)
        replies = ["".join(before + (d.mode or "?") for (before, _), d in zip(steps, dists)) for dists in results]
        rationales = self._rationales(prompts, replies, results)
        return [self._judgment(sample, r, dists, reply, why)
                for r, dists, reply, why in zip(responses, results, replies, rationales)]

    def _judgment(self, sample, r, dists: list[LabelDist], reply: str, rationale: str) -> Judgment:
        aspects = self.spec.aspects
        usage = Usage()
        for d in dists:
            usage = usage.add(d.usage)
        raw = next((d.raw for d in dists if d.raw), None) or reply
        base = self._base(sample, r, raw=raw, distributions={a: {k: round(v, 6) for k, v in d.probs.items()}
                                                              for a, d in zip(aspects, dists)},
                          label_mass={a: round(d.mass, 6) for a, d in zip(aspects, dists)}, path=_paths(dists),
                          **usage_fields(usage))
        bad = [(a, d) for a, d in zip(aspects, dists) if not d.ok]
        if bad:
            a, d = bad[0]
            return Judgment(ok=False, error=f"{a}: {d.error}", failure=d.failure, **base)
        scores = {a: round(d.expected, 4) for a, d in zip(aspects, dists)}
        return Judgment(ok=True, scores=scores, overall=round(sum(scores.values()) / len(scores), 4),
                        rationale=rationale, **base)

    def _rationales(self, prompts, replies, results) -> list[str]:
        """One sentence after the scores (the scores are read first, so the rationale cannot sway them)."""
        out = [""] * len(prompts)
        todo = [i for i, dists in enumerate(results) if all(d.ok for d in dists)]
        if not self.rationale or not todo or not hasattr(self.lm, "complete"):
            return out
        texts = self.lm.complete([prompts[i] for i in todo], [replies[i] + RATIONALE_HEADER for i in todo],
                                 self.max_new_tokens, 0.0)
        for i, t in zip(todo, texts):
            out[i] = (t.splitlines() or [""])[0].strip()
        return out

    # ------------------------------------------------------------------ pairwise

    def compare(self, sample: SampleView, first: ResponseView, second: ResponseView) -> Verdict:
        if self.mode == "text":
            return self._compare_text(sample, first, second)
        ctx = self._context(sample)
        tag = pairwise_version()
        queries = [LabelQuery(render_pairwise(self.spec, response_a=a.text, response_b=b.text, **ctx),
                              PAIRWISE_PREFILL, PAIRWISE_LABELS, tag) for a, b in ((first, second), (second, first))]
        ab, ba = label_distributions(self.lm, queries, self.min_label_mass)
        ok = ab.ok and ba.ok
        wa, wb = (ab.mode, ba.mode) if ok else (None, None)
        p_ab, p_ba = ab.probs.get("A"), ba.probs.get("B")  # P(first is better) in each order
        failed = ab if not ab.ok else ba
        return Verdict(
            verdict_id="", sample_id=sample.sample_id, first_id=first.response_id, second_id=second.response_id,
            winner_ab=wa, winner_ba=wb, ok=ok, consistent=ok and (wa == "A") != (wb == "A"),
            error=None if ok else f"{'first' if failed is ab else 'swapped'} order: {failed.error}",
            raw=f"{ab.raw or ab.mode}\n---\n{ba.raw or ba.mode}", judge=f"{self.name}/{tag}", judge_actor=self.actor,
            probs_ab={k: round(v, 6) for k, v in ab.probs.items()},
            probs_ba={k: round(v, 6) for k, v in ba.probs.items()},
            p_first=round((p_ab + p_ba) / 2, 6) if p_ab is not None and p_ba is not None else None,
            label_mass_ab=round(ab.mass, 6), label_mass_ba=round(ba.mass, 6), path=_paths([ab, ba]),
            failure="" if ok else failed.failure, **usage_fields(ab.usage.add(ba.usage)),
        )

    # ------------------------------------------------------------------ free text (mode: text)

    def _ask(self, prompts: list[str], parse) -> list[tuple[object | None, str, str | None, int]]:
        """Ask every prompt, re-asking only the unparsed ones; (parsed, raw, error, attempts)."""
        results: list = [None] * len(prompts)
        todo = list(range(len(prompts)))
        for attempt in range(1 + self.max_parse_retries):
            temp = 0.0 if attempt == 0 else self.retry_temperature
            texts = self.lm.chat([prompts[i] for i in todo], self.max_new_tokens, temp, seed=attempt)
            still = []
            for i, text in zip(todo, texts):
                try:
                    results[i] = (parse(text), text, None, attempt + 1)
                except JudgeParseError as e:
                    results[i] = (None, text, str(e), attempt + 1)
                    still.append(i)
            todo = still
            if not todo:
                break
        return results

    def _score_text(self, sample: SampleView, responses: list[ResponseView]) -> list[Judgment]:
        ctx = self._context(sample)
        prompts = [self.spec.render(response=r.text, **ctx) for r in responses]
        out = []
        for r, (parsed, raw, err, attempts) in zip(responses, self._ask(
                prompts, lambda t: parse_scores(t, self.spec.aspects, self.spec.scale))):
            base = self._base(sample, r, raw=raw, attempts=attempts, path="text")
            if parsed is None:
                out.append(Judgment(ok=False, error=f"unparseable after {attempts} attempts: {err}", failure="unparsed",
                                    **base))
            else:
                scores, rationale = parsed
                out.append(Judgment(ok=True, scores=scores, overall=round(sum(scores.values()) / len(scores), 4),
                                    rationale=rationale, **base))
        return out

    def _compare_text(self, sample: SampleView, first: ResponseView, second: ResponseView) -> Verdict:
        ctx = self._context(sample)
        prompts = [render_pairwise(self.spec, response_a=first.text, response_b=second.text, **ctx),
                   render_pairwise(self.spec, response_a=second.text, response_b=first.text, **ctx)]
        (ab, raw_ab, err_ab, _), (ba, raw_ba, err_ba, _) = self._ask(prompts, parse_winner)
        ok = ab is not None and ba is not None
        wa, wb = (ab[0] if ab else None), (ba[0] if ba else None)
        return Verdict(
            verdict_id="", sample_id=sample.sample_id, first_id=first.response_id, second_id=second.response_id,
            winner_ab=wa, winner_ba=wb, ok=ok, consistent=ok and (wa == "A") != (wb == "A"),
            error=None if ok else f"unparseable: {err_ab or err_ba}", raw=f"{raw_ab}\n---\n{raw_ba}",
            judge=f"{self.name}/{pairwise_version()}", judge_actor=self.actor, path="text",
            failure="" if ok else "unparsed",
        )


def build(cfg, actor: str = ""):
    """The LLM judge a JudgeConfig asks for, on its engine."""
    from vpref.judges.engines import make_engine

    return LLMJudge(make_engine(cfg, name=actor), cfg.rubric, cfg.show_reference, cfg.max_parse_retries, cfg.max_new_tokens,
                    cfg.retry_temperature, actor=actor, mode=cfg.mode, min_label_mass=cfg.min_label_mass,
                    rationale=cfg.rationale)


def identity(cfg) -> tuple[str, str, str]:
    from vpref.judges.engines import model_name

    r = load_rubric(cfg.rubric)
    return f"llm:{model_name(cfg.model)}", r.name, r.version  # as LLMJudge names itself
