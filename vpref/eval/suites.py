"""The evaluation suites as data: which set, which protocol, which aggregation.

    videochatgpt   generic set x {correctness, detail, context}, temporal set x temporal,
                   consistency set x consistency (two answers, one judgment); integer 0-5;
                   per-dimension means and the mean of the five (Video-ChatGPT / VLM-RLAIF)
    zeroshot       each QA set: yes/no + 0-5; accuracy = yes / (yes + no), mean score
    grounded       each QA set, the judge sees the caption: 1-5; mean and share >= 3 (LLaVA-Hound)
    winrate        model vs a baseline policy on the same questions, both orders (MT-Bench rule),
                   (W + 0.5 T) / N and the length-controlled rate (AlpacaEval 2's GLM)

Every figure is an `Estimate` with a bootstrap 95% interval; failed ratings are counted next to
it and left out of it.  `run_suite(name, ...)` returns (metrics, rows); rows are the per-item
records (ratings with raw replies) for `eval_ratings.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vpref.data.manifest import Sample
from vpref.eval import stats
from vpref.eval.judge import Item, Rating

VCGPT_DIMENSIONS = {  # dimension -> (protocol, set), in the papers' column order
    "correctness": ("vcgpt_correctness", "generic"),
    "detail": ("vcgpt_detail", "generic"),
    "context": ("vcgpt_context", "generic"),
    "temporal": ("vcgpt_temporal", "temporal"),
    "consistency": ("vcgpt_consistency", "consistency"),
}
SUITE_PROTOCOLS = {
    "videochatgpt": tuple(p for p, _ in VCGPT_DIMENSIONS.values()),
    "zeroshot": ("zeroshot_qa",),
    "grounded": ("grounded_hound",),
    "winrate": ("winrate_pairwise",),
}
SUITE_SETS = {"videochatgpt": ("generic", "temporal", "consistency"), "zeroshot": ("qa",), "grounded": ("qa",)}

Key = tuple[str, str]  # (video, question): what the policy is asked


@dataclass
class EvalSets:
    generic: list[Sample] = field(default_factory=list)
    temporal: list[Sample] = field(default_factory=list)
    consistency: list[Sample] = field(default_factory=list)
    qa: dict[str, list[Sample]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # set -> why it is not there

    def named(self, name: str) -> list[Sample]:
        if name == "qa":
            return [s for samples in self.qa.values() for s in samples]
        return getattr(self, name)

    def asks(self, names) -> list[Key]:
        """Every (video, question) the suites over these sets need answered, in first-seen order."""
        seen: dict[Key, None] = {}
        for name in names:
            for s in self.named(name):
                seen[(s.video, s.question)] = None
                if name == "consistency":
                    seen[(s.video, s.meta["question2"])] = None
        return list(seen)


@dataclass
class SuiteContext:
    judge: object  # a SuiteJudge
    answers: dict[Key, str]
    baseline: dict[Key, str] | None = None  # winrate: the baseline policy's answers
    baseline_name: str | None = None
    winrate_sets: tuple[str, ...] = ("generic", "temporal", "qa")
    reps: int = 1000
    seed: int = 0
    lc_l1: float = 1e-3
    lc_reps: int = 400


def _fields(s: Sample, prediction: str) -> dict:
    return {"question": s.question, "answer": s.answer, "prediction": prediction, "caption": s.caption,
            "family": s.family}


def _rows(suite: str, proto: str, ratings: list[Rating], set_name: str | None = None) -> list[dict]:
    return [{"suite": suite, "protocol": proto, "set": set_name, **r.to_json()} for r in ratings]


def _values(ratings: list[Rating], key: str) -> np.ndarray:
    """The ratings' `key` values, NaN where a rating failed (or, distributional, lacks that value)."""
    return np.array([float(r.value[key]) if r.ok and key in r.value else np.nan for r in ratings])


def _with_failed(est: stats.Estimate, ratings: list[Rating]) -> dict:
    return {**est.to_json(), "failed": sum(not r.ok for r in ratings)}


def _failure_reasons(ratings: list[Rating], k: int = 3) -> list[str]:
    seen: dict[str, int] = {}
    for r in ratings:
        if not r.ok:
            seen[r.error or "?"] = seen.get(r.error or "?", 0) + 1
    return [f"{n}x {e}" for e, n in sorted(seen.items(), key=lambda x: -x[1])[:k]]


# --------------------------------------------------------------------------- the suites


def videochatgpt(sets: EvalSets, ctx: SuiteContext) -> tuple[dict, list[dict]]:
    counts = {name: stats.resample_counts(len(sets.named(name)), ctx.reps, ctx.seed + i)
              for i, name in enumerate(("generic", "temporal", "consistency"))}
    dims, rows, columns, failures = {}, [], [], []
    for dim, (proto, set_name) in VCGPT_DIMENSIONS.items():
        samples = sets.named(set_name)
        if not samples:
            dims[dim] = {"value": None, "ci95": [None, None], "n": 0, "failed": 0,
                         "skipped": sets.missing.get(set_name, f"the {set_name} set is empty")}
            continue
        if dim == "consistency":
            items = [Item(s.id, {"question1": s.question, "question2": s.meta["question2"], "answer": s.answer,
                                 "prediction1": ctx.answers[(s.video, s.question)],
                                 "prediction2": ctx.answers[(s.video, s.meta["question2"])],
                                 "caption": s.caption, "family": s.family}) for s in samples]
        else:
            items = [Item(s.id, _fields(s, ctx.answers[(s.video, s.question)])) for s in samples]
        ratings = ctx.judge.rate(proto, items)
        values = _values(ratings, "score")
        dims[dim] = _with_failed(stats.mean(values, counts[set_name]), ratings)
        columns.append((values, counts[set_name]))
        failures += ratings
        rows += _rows("videochatgpt", proto, ratings, set_name)
    complete = len(columns) == len(VCGPT_DIMENSIONS)
    mean = stats.mean_of_means(columns).to_json() if complete else {"value": None, "ci95": [None, None], "n": 0}
    return {"dimensions": dims, "mean": mean, "failure_reasons": _failure_reasons(failures)}, rows


def zeroshot(sets: EvalSets, ctx: SuiteContext) -> tuple[dict, list[dict]]:
    out, rows = {}, []
    for i, (name, samples) in enumerate(sets.qa.items()):
        items = [Item(s.id, _fields(s, ctx.answers[(s.video, s.question)])) for s in samples]
        ratings = ctx.judge.rate("zeroshot_qa", items)
        counts = stats.resample_counts(len(items), ctx.reps, ctx.seed + 10 + i)
        pred = [r.value["pred"] if r.ok else None for r in ratings]
        yes = np.array([p == "yes" for p in pred], float)
        decided = np.array([p in ("yes", "no") for p in pred], float)
        out[name] = {"accuracy": stats.ratio(yes, decided, counts).to_json(),
                     "score": stats.mean(_values(ratings, "score"), counts).to_json(),
                     "yes": int(yes.sum()), "no": int(decided.sum() - yes.sum()),
                     "neither": sum(p == "neither" for p in pred), "failed": sum(not r.ok for r in ratings),
                     "items": len(items), "failure_reasons": _failure_reasons(ratings)}
        rows += _rows("zeroshot", "zeroshot_qa", ratings, name)
    return {"sets": out}, rows


def grounded(sets: EvalSets, ctx: SuiteContext) -> tuple[dict, list[dict]]:
    out, rows = {}, []
    for i, (name, samples) in enumerate(sets.qa.items()):
        items = [Item(s.id, _fields(s, ctx.answers[(s.video, s.question)])) for s in samples]
        ratings = ctx.judge.rate("grounded_hound", items)
        counts = stats.resample_counts(len(items), ctx.reps, ctx.seed + 20 + i)
        score = _values(ratings, "score")
        at_least_3 = np.where(np.isfinite(score), (score >= 3).astype(float), np.nan)
        as_1 = np.where(np.isfinite(score), score, 1.0)  # the original scripts' fallback for no score
        out[name] = {"score": _with_failed(stats.mean(score, counts), ratings),
                     "share_ge3": stats.mean(at_least_3, counts).to_json(),
                     "score_failures_as_1": stats.mean(as_1, counts).to_json(),
                     "items": len(items), "failure_reasons": _failure_reasons(ratings)}
        rows += _rows("grounded", "grounded_hound", ratings, name)
    return {"sets": out}, rows


def winrate(sets: EvalSets, ctx: SuiteContext) -> tuple[dict, list[dict]]:
    if ctx.baseline is None:
        return {"skipped": "the policy is the baseline", "baseline": ctx.baseline_name}, []
    seen: dict[Key, tuple[Sample, str]] = {}
    for name in ctx.winrate_sets:
        for s in sets.named(name):
            seen.setdefault((s.video, s.question), (s, name))
    keys = list(seen)
    model = [ctx.answers[k] for k in keys]
    base = [ctx.baseline[k] for k in keys]
    judged = [i for i, k in enumerate(keys) if model[i].strip() != base[i].strip()]
    items = []
    for i in judged:
        s = seen[keys[i]][0]
        f = {"question": s.question, "answer": s.answer, "caption": s.caption, "family": s.family}
        items.append(Item(f"{s.id}:model-first", {**f, "response_a": model[i], "response_b": base[i]}))
        items.append(Item(f"{s.id}:model-second", {**f, "response_a": base[i], "response_b": model[i]}))
    ratings = ctx.judge.rate("winrate_pairwise", items) if items else []
    verdict = {it.id: (r.value["winner"] if r.ok else None) for it, r in zip(items, ratings)}
    outcomes, y, dlen, groups, dropped = [], [], [], [], 0
    for i, k in enumerate(keys):
        s, set_name = seen[k]
        if i in judged:
            o = stats.combine_orders(verdict[f"{s.id}:model-first"], verdict[f"{s.id}:model-second"])
        else:
            o = "tie"  # identical answers: a tie without asking (as AlpacaEval does)
        if o is None:
            dropped += 1
            continue
        outcomes.append(o)
        y.append(stats.OUTCOME_Y[o])
        dlen.append(len(model[i]) - len(base[i]))
        groups.append(s.family or set_name)
    counts = stats.resample_counts(len(outcomes), ctx.reps, ctx.seed + 30)
    raw = stats.win_rate(outcomes, counts)
    lc = stats.length_controlled(y, dlen, groups, ctx.lc_l1, ctx.lc_reps, ctx.seed + 31)
    metrics = {
        "baseline": ctx.baseline_name, "win_rate": raw.to_json(), "lc_win_rate": lc["value"].to_json(),
        "lc_weights": lc["weights"], "wins": outcomes.count("win"), "losses": outcomes.count("loss"),
        "ties": outcomes.count("tie"), "identical": len(keys) - len(judged), "dropped": dropped, "questions": len(keys),
        "lc_warning": bool(raw.value is not None and lc["value"].value is not None
                           and stats.extreme_change(raw.value, lc["value"].value)),
        "mean_chars": {"model": float(np.mean([len(m) for m in model])) if model else None,
                       "baseline": float(np.mean([len(b) for b in base])) if base else None},
        "failure_reasons": _failure_reasons(ratings),
    }
    return metrics, _rows("winrate", "winrate_pairwise", ratings)


SUITES = {"videochatgpt": videochatgpt, "zeroshot": zeroshot, "grounded": grounded, "winrate": winrate}


def sets_needed(suites, winrate_sets) -> list[str]:
    names: list[str] = []
    for s in suites:
        for n in (winrate_sets if s == "winrate" else SUITE_SETS[s]):
            if n not in names:
                names.append(n)
    return names


def run_suite(name: str, sets: EvalSets, ctx: SuiteContext) -> tuple[dict, list[dict]]:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    metrics, rows = SUITES[name](sets, ctx)
    metrics["version"] = ctx.judge.suite_version(name, SUITE_PROTOCOLS[name])
    return metrics, rows


def failed_share(metrics: dict) -> float:
    """The share of ratings that failed across a run of suites (for a command's exit status)."""
    failed = total = 0
    for name, m in metrics.items():
        if not isinstance(m, dict):
            continue
        if name == "videochatgpt":
            for d in m.get("dimensions", {}).values():
                failed += d.get("failed", 0)
                total += d.get("n", 0) + d.get("failed", 0)
        elif name in ("zeroshot", "grounded"):
            for s in m.get("sets", {}).values():
                failed += s.get("failed", s.get("score", {}).get("failed", 0))
                total += s.get("items", 0)
        elif name == "winrate" and "dropped" in m:
            failed += m["dropped"]
            total += m["questions"] - m["identical"]
    return failed / total if total else 0.0
