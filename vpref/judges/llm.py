"""An LLM judge: rubric templates filled with the video's detailed caption as context.

Pointwise scoring of each answer on the rubric's aspects, and pairwise comparison run in both
orders.  Answers that do not parse are retried (greedy first, then sampled) a bounded number of
times, then recorded as failed judgments with the raw text -- counted, never a silent 0 or None.
"""

from __future__ import annotations

from pathlib import Path

from vpref.data.schema import Judgment, Verdict, judgment_id
from vpref.judges.base import ResponseView, SampleView
from vpref.judges.parsing import JudgeParseError, parse_scores, parse_winner
from vpref.judges.rubric import load_rubric, pairwise_version, render_pairwise

NO_CONTEXT = "(no description available)"


class LLMJudge:
    def __init__(self, lm, rubric: str = "mmaipv", show_reference: bool = True, max_parse_retries: int = 2,
                 max_new_tokens: int = 64, retry_temperature: float = 0.7, actor: str = ""):
        self.lm = lm
        self.spec = load_rubric(rubric)
        self.rubric, self.rubric_version = self.spec.name, self.spec.version
        self.name = f"llm:{Path(lm.path).name}"
        self.show_reference = show_reference
        self.max_parse_retries = max_parse_retries
        self.max_new_tokens = max_new_tokens
        self.retry_temperature = retry_temperature
        self.actor = actor

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

    def _context(self, sample: SampleView) -> dict:
        return dict(question=sample.question, context=sample.caption or NO_CONTEXT,
                    reference=sample.answer if self.show_reference else None)

    def score(self, sample: SampleView, responses: list[ResponseView]) -> list[Judgment]:
        ctx = self._context(sample)
        prompts = [self.spec.render(response=r.text, **ctx) for r in responses]
        out = []
        for r, (parsed, raw, err, attempts) in zip(responses, self._ask(
                prompts, lambda t: parse_scores(t, self.spec.aspects, self.spec.scale))):
            base = dict(judgment_id=judgment_id(r.response_id, self.name), response_id=r.response_id,
                        sample_id=sample.sample_id, judge=self.name, rubric=self.rubric,
                        rubric_version=self.rubric_version, raw=raw, attempts=attempts, judge_actor=self.actor)
            if parsed is None:
                out.append(Judgment(ok=False, error=f"unparseable after {attempts} attempts: {err}", **base))
            else:
                scores, rationale = parsed
                out.append(Judgment(ok=True, scores=scores, overall=round(sum(scores.values()) / len(scores), 4),
                                    rationale=rationale, **base))
        return out

    def compare(self, sample: SampleView, first: ResponseView, second: ResponseView) -> Verdict:
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
            judge=f"{self.name}/{pairwise_version()}", judge_actor=self.actor,
        )
