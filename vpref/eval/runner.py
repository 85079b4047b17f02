"""Running the configured suites on a policy's answers: the sets, the baseline's answers (made once
and cached), the judge, the metrics.

The driver (`vpref.loop.Evaluator`, `vpref eval`) generates answers; this module says which
questions need answers (`SuiteRunner.asks`), keeps the baseline's answers on disk so that the win
rate never regenerates them, and runs the suites.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from vpref.data.manifest import Reject, Sample, append_rejects, load_manifest
from vpref.eval.suites import EvalSets, SuiteContext, run_suite, sets_needed
from vpref.utils import log

DEFAULT_FILES = {"generic": "vcgpt_generic.jsonl", "temporal": "vcgpt_temporal.jsonl",
                 "consistency": "vcgpt_consistency.jsonl", "qa": {"synth-qa": "zeroshot_qa.jsonl"}}


def _subsample(samples: list[Sample], k: int | None, seed: int, name: str) -> list[Sample]:
    if k is None or k >= len(samples):
        return samples
    seed_name = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
    keep = np.random.default_rng([seed, seed_name]).choice(len(samples), k, replace=False)
    return [samples[i] for i in sorted(keep)]


def _check(name: str, samples: list[Sample], source: str) -> tuple[list[Sample], list[Reject]]:
    """Rows a suite cannot judge are set aside with the reason (a reference answer is required;
    consistency rows need their second question)."""
    ok, bad = [], []
    for s in samples:
        reason = None
        if not s.answer:
            reason = f"the {name} set needs a reference answer (field 'answer')"
        elif name == "consistency" and not isinstance(s.meta.get("question2"), str):
            reason = "a consistency row needs its second wording in meta.question2"
        if reason:
            bad.append(Reject(source, 0, s.id, reason, s.to_row()))
        else:
            ok.append(s)
    return ok, bad


def load_sets(cfg, names: list[str], rejects_path: str | Path | None = None) -> EvalSets:
    """The sets `names` (generic, temporal, consistency, qa) of `cfg.eval.sets`.  A set left null
    is looked for next to `data.test` (where `vpref synth` writes them); if it is not there the
    suites that need it say so.  A set named explicitly must exist."""
    e, data = cfg.eval, cfg.data
    sets = EvalSets()
    rejects: list[Reject] = []
    base = Path(data.test).parent
    for name in names:
        explicit = getattr(e.sets, name)
        if explicit is None:
            default = DEFAULT_FILES[name]
            paths = ({k: base / v for k, v in default.items()} if name == "qa" else {name: base / default})
            if not all(p.is_file() for p in paths.values()):
                sets.missing[name] = (f"no {name} set: {', '.join(str(p) for p in paths.values())} not found "
                                      f"(`vpref synth` writes it; or set eval.sets.{name})")
                continue
        else:
            paths = {k: Path(v) for k, v in explicit.items()} if name == "qa" else {name: Path(explicit)}
        for key, path in paths.items():
            m = load_manifest(path, data.root)
            rejects += m.rejects
            samples, bad = _check(name, m.samples, str(path))
            rejects += bad
            samples = _subsample(samples, e.max_items, e.seed, f"{name}/{key}")
            if name == "qa":
                sets.qa[key] = samples
            else:
                setattr(sets, name, samples)
    if rejects and rejects_path is not None:
        append_rejects(rejects_path, rejects)
        log(f"eval sets: {len(rejects)} rows set aside (see {rejects_path})")
    return sets


class AnswerCache:
    """Greedy answers of one checkpoint, on disk: `answers-<key>.jsonl` per (checkpoint, settings)."""

    def __init__(self, folder: str | Path, max_new_tokens: int):
        self.dir = Path(folder)
        self.max_new_tokens = max_new_tokens

    def _file(self, checkpoint: str) -> Path:
        p = Path(checkpoint).resolve()
        weights = sorted(p.glob("*.safetensors"))
        stamp = ",".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)
        key = hashlib.sha1(f"{p}|{stamp}|{self.max_new_tokens}".encode()).hexdigest()[:12]
        return self.dir / f"answers-{key}.jsonl"

    def get(self, checkpoint: str) -> dict:
        f = self._file(checkpoint)
        if not f.is_file():
            return {}
        out = {}
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out[(r["video"], r["question"])] = r["answer"]
        return out

    def put(self, checkpoint: str, answers: dict) -> None:
        have = self.get(checkpoint)
        new = {k: v for k, v in answers.items() if k not in have}
        if not new:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self._file(checkpoint), "a") as f:
            for (video, question), text in new.items():
                f.write(json.dumps({"checkpoint": str(checkpoint), "video": video, "question": question,
                                    "answer": text}) + "\n")


def same_checkpoint(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


class SuiteRunner:
    """The configured suites of one run (or one `vpref eval`): sets loaded and judge made once."""

    def __init__(self, cfg, judge, cache_dir: str | Path, rejects_path: str | Path | None = None,
                 suites: list[str] | None = None):
        e = cfg.eval
        self.cfg, self.judge = cfg, judge
        self.suites = list(suites if suites is not None else e.suites)
        self.sets = load_sets(cfg, sets_needed(self.suites, e.winrate_sets), rejects_path)
        for name, why in self.sets.missing.items():
            log(f"eval: {why}")
        policy = cfg.policy_member
        self.baseline = e.winrate_baseline or (policy.path if policy else None)
        self.cache = AnswerCache(cache_dir, e.max_new_tokens)

    @property
    def asks(self) -> list[tuple[str, str]]:
        return self.sets.asks(sets_needed(self.suites, self.cfg.eval.winrate_sets))

    @property
    def videos(self) -> list[str]:
        return sorted({v for v, _ in self.asks})

    def drop_videos(self, failed: dict[str, str], rejects_path: str | Path | None = None) -> None:
        """Set aside the items whose video did not decode (with the decoder's reason)."""
        if not failed:
            return
        rejects = []

        def keep(samples):
            out = []
            for s in samples:
                if s.video in failed:
                    rejects.append(Reject("decode", 0, s.id, f"video {s.video}: {failed[s.video]}", s.to_row()))
                else:
                    out.append(s)
            return out

        for name in ("generic", "temporal", "consistency"):
            setattr(self.sets, name, keep(getattr(self.sets, name)))
        self.sets.qa = {k: keep(v) for k, v in self.sets.qa.items()}
        if rejects_path is not None:
            append_rejects(rejects_path, rejects)

    def baseline_answers(self, checkpoint: str, generate_baseline) -> dict | None:
        """The baseline's answers to every ask; None when `checkpoint` is the baseline (the win rate
        is then skipped).  The cache is read first; `generate_baseline(asks)` makes the missing ones."""
        if "winrate" not in self.suites or self.baseline is None or same_checkpoint(checkpoint, self.baseline):
            return None
        have = self.cache.get(self.baseline)
        missing = [k for k in self.asks if k not in have]
        if missing:
            log(f"eval: generating the baseline's answers to {len(missing)} questions ({self.baseline})")
            made = generate_baseline(missing)
            self.cache.put(self.baseline, made)
            have.update(made)
        return have

    def run(self, answers: dict, baseline: dict | None) -> tuple[dict, list[dict]]:
        e = self.cfg.eval
        ctx = SuiteContext(self.judge, answers, baseline, self.baseline, tuple(e.winrate_sets), e.bootstrap, e.seed,
                           e.lc_l1, e.lc_bootstrap)
        metrics: dict = {"judge": {"name": self.judge.name}, "missing_sets": dict(self.sets.missing)}
        rows: list[dict] = []
        for name in self.suites:
            t0 = time.perf_counter()
            m, r = run_suite(name, self.sets, ctx)
            m["seconds"] = round(time.perf_counter() - t0, 2)
            metrics[name] = m
            rows += r
        return metrics, rows
