"""The per-round evaluation of a policy hosted by the data engine's policy actors: greedy answers
on the evaluation split (exact match, the build judge's rubric scores, lengths) and the configured
suites (`vpref.eval.suites`) on the same answers.  Used by the Iter-W2S driver and `vpref eval`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray

from vpref.actors.judge import response_item
from vpref.config import Config
from vpref.data.manifest import Reject, Sample, append_rejects
from vpref.data.world import FAMILIES, is_correct
from vpref.eval.evaluate import EvalRecord, compute_metrics
from vpref.eval.judge import suite_judge
from vpref.eval.runner import SuiteRunner


class Evaluator:
    """Greedy answers of the policy actors on a split, judged; the split's videos (and the suites'
    videos, `extra_videos`) decoded once."""

    def __init__(self, engine, cfg: Config, samples: list[Sample], rejects_path: Path,
                 extra_videos=()):
        self.engine, self.cfg = engine, cfg
        samples = engine.with_captions(samples, rejects_path.parent)  # the judge's context, as in training
        refs = {v: engine.decoders.submit(v) for v in sorted({s.video for s in samples} | set(extra_videos))}
        self.clips, self.failed_videos = {}, {}
        for v, ref in refs.items():
            try:
                ray.get(ref)
                self.clips[v] = ref
            except Exception as e:
                self.failed_videos[v] = str(e).splitlines()[-1]
        bad = self.failed_videos
        append_rejects(rejects_path, [Reject("decode", 0, s.id, f"video {s.video}: {bad[s.video]}", s.to_row())
                                      for s in samples if s.video in bad])
        self.samples = [s for s in samples if s.video in self.clips]

    def generate(self, asks: list[tuple[str, str]]) -> list:
        """Greedy completions of the loaded policy for (video, question) pairs, batches spread over
        the policy replicas."""
        replicas = self.engine.policy_replicas()
        bs = self.cfg.eval.batch_size
        greedy = {"temperature": 0.0, "n": 1, "max_new_tokens": self.cfg.eval.max_new_tokens}
        calls = []
        for k, i in enumerate(range(0, len(asks), bs)):
            chunk = asks[i:i + bs]
            actor = replicas[k % len(replicas)]
            calls.append(actor.generate.remote([self.clips[v] for v, _ in chunk], [q for _, q in chunk], greedy, seed=i))
        return [c[0] for ref in calls for c in ray.get(ref)]

    def answer(self, asks: list[tuple[str, str]], have: dict | None = None) -> dict:
        """{(video, question): text} for every ask, generating only those not in `have`."""
        have = dict(have or {})
        todo = [k for k in asks if k not in have]
        have.update({k: c.text for k, c in zip(todo, self.generate(todo))})
        return {k: have[k] for k in asks}

    def __call__(self, limit: int | None = None) -> tuple[dict, list[dict]]:
        samples = self.samples[:limit]
        answers = self.generate([(s.video, s.question) for s in samples])
        items = [response_item(f"eval:{s.id}", a.text, s.id, s.question, s.answer, s.caption, s.family)
                 for s, a in zip(samples, answers)]
        judgments = self.engine.judge_items(items)
        records = [EvalRecord(s, a, j) for s, a, j in zip(samples, answers, judgments)]
        rows = [{"id": s.id, "family": s.family, "video": s.video, "question": s.question, "reference": s.answer,
                 "answer": a.text,
                 "correct": is_correct(s.family, a.text, s.answer) if s.answer and s.family in FAMILIES else None,
                 "judge": j.overall, "judge_scores": j.scores} for s, a, j in zip(samples, answers, judgments)]
        return compute_metrics(records), rows

    def suites(self, runner: SuiteRunner, checkpoint: str, version: int, rows: list[dict]) -> tuple[dict, list[dict]]:
        """The configured suites on the loaded policy (`checkpoint`): answers the split already gave
        (or the cache holds) are reused, and all are cached; the baseline's answers come from the
        cache, else are made once (the baseline is loaded for that, then `checkpoint` again)."""
        t0 = time.perf_counter()
        have = {**runner.cache.get(checkpoint), **{(r["video"], r["question"]): r["answer"] for r in rows}}
        answers = self.answer(runner.asks, have)
        runner.cache.put(checkpoint, answers)  # a later comparison against this checkpoint reads them
        made = {"answers": sum(k not in have for k in runner.asks), "baseline_answers": 0}

        def baseline(asks):
            made["baseline_answers"] = len(asks)
            self.engine.reload_policy(runner.baseline, version=0)
            try:
                return self.answer(asks)
            finally:
                self.engine.reload_policy(checkpoint, version=version)

        base = runner.baseline_answers(checkpoint, baseline)
        t1 = time.perf_counter()
        metrics, ratings = runner.run(answers, base)
        # what the suites added to the round: generations beyond the split's, and time
        metrics["cost"] = {**made, "generate_s": round(t1 - t0, 2), "judge_and_stats_s": round(time.perf_counter() - t1, 2)}
        return metrics, ratings


def suite_runner(cfg: Config, run_dir: Path, rejects: Path, suites: list[str] | None = None):
    """The suites of `cfg.eval` with their judge (None when no suite is configured)."""
    names = list(suites if suites is not None else cfg.eval.suites)
    if not names:
        return None
    judge = suite_judge(cfg.eval.judge, cfg.ray.namespace)
    return SuiteRunner(cfg, judge, run_dir / "eval_cache", rejects, names)


def evaluate_round(test: Evaluator, runner: SuiteRunner | None, t: int, path: str, out_dir: Path,
                   limit: int | None) -> dict:
    """Evaluate the loaded policy `path`: the split's metrics, then the suites; answers and ratings
    are written to `out_dir`."""
    metrics, rows = test(limit)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "eval_answers.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if runner is not None:
        metrics["suites"], ratings = test.suites(runner, path, t, rows)
        with open(out_dir / "eval_ratings.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in ratings)
    return metrics


