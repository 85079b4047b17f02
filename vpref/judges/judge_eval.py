"""How good is a judge?  `vpref judge-eval CONFIG` measures every configured judge the same way.

On the synthetic world the truth is known.  Each question gets four answers: the reference answer,
a wrong one (one world word swapped, checked wrong by the world's own grammar), and both again
lengthened by a sentence that states nothing (so correctness is unchanged).  Per judge:

* pairwise accuracy: P(score(correct) > score(wrong)) over the (short, short) and (long, long)
  pairs of each question; a tie or a failed judgment counts 1/2
* Kendall tau-b of its scores against the reference judge's, over all answers both scored
* position bias: share of (correct, wrong) comparisons, asked in both orders, whose verdict
  follows the position instead of the answer (`compare` judged the same slot best both times)
* length bias: score change per 10 added words at equal correctness (long minus short answer)
* failure rate (unparsed, low label mass, endpoint), judgments per second
* 95% intervals by a bootstrap over questions

On answers without ground truth (`judge_eval.answers_from`: a build folder) only agreement
between judges is measured.  Writes judge_eval.json, judge_eval.md and judge_eval.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpref.judges.base import ResponseView, SampleView
from vpref.utils import log

FILLER = "I looked at the whole video carefully before giving this answer."


@dataclass
class Answer:
    response_id: str
    text: str
    correct: bool | None
    long: bool = False


@dataclass
class Item:
    sample: SampleView
    answers: list[Answer]


def world_items(samples, max_questions: int | None, seed: int = 0) -> list[Item]:
    """Questions of the synthetic world with (correct, wrong) x (short, long) answers."""
    from vpref.data.world import is_correct, perturb

    rng = np.random.default_rng(seed)
    items = []
    for s in samples:
        if max_questions is not None and len(items) >= max_questions:
            break
        fam = s.family
        if not (s.answer and s.caption and fam):
            continue
        wrong = next((w for w in (perturb(s.answer, rng) for _ in range(20)) if not is_correct(fam, w, s.answer)), None)
        if wrong is None:
            continue
        texts = [(s.answer, True, False), (wrong, False, False), (f"{s.answer} {FILLER}", True, True),
                 (f"{wrong} {FILLER}", False, True)]
        if any(is_correct(fam, t, s.answer) != c for t, c, _ in texts):
            continue
        view = SampleView(s.id, s.question, s.answer, s.caption, fam)
        items.append(Item(view, [Answer(f"{s.id}:{k}", t, c, lg) for k, (t, c, lg) in enumerate(texts)]))
    return items


def build_items(folder: str | Path, max_questions: int | None) -> list[Item]:
    """The responses of a finished build (answers without ground truth): agreement only."""
    from vpref.data.schema import read_records

    plan = json.loads((Path(folder) / "plan.json").read_text())
    by_sample: dict[str, list[Answer]] = {}
    for r in read_records(folder, "responses"):
        if r.error is None:
            by_sample.setdefault(r.sample_id, []).append(Answer(r.response_id, r.text, None))
    items = []
    for sid, answers in sorted(by_sample.items()):
        s = plan["samples"][sid]
        if len(answers) >= 2:
            items.append(Item(SampleView(sid, s["question"], s.get("answer"), s.get("caption"), s.get("family")),
                              answers))
    return items[:max_questions] if max_questions is not None else items


# --------------------------------------------------------------------------- statistics


def kendall_tau_b(x, y) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return None
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), 1)
    dx, dy = dx[iu], dy[iu]
    denom = np.sqrt((dx != 0).sum() * (dy != 0).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else None


def _interval(values: list[float]) -> list[float] | None:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return [round(float(np.quantile(v, 0.025)), 4), round(float(np.quantile(v, 0.975)), 4)] if len(v) >= 10 else None


class _Per:
    """Per-question raw material of one judge, so every figure can be bootstrapped by question."""

    def __init__(self):
        self.pairs: list[list[float]] = []  # per question: 1 / 0.5 / 0 per (correct, wrong) pair
        self.pairs_any: list[list[float]] = []  # the same, reading failed distributional judgments too
        self.flips: list[list[float]] = []  # per question: 1 when the verdict followed the position
        self.flips_any: list[list[float]] = []  # the same, reading low-mass verdicts' probabilities too
        self.verdict_right: list[list[float]] = []  # per question: consistent verdict picks the correct answer
        self.slopes: list[list[float]] = []  # per question: score change per word, long vs short
        self.scores: list[dict[str, float]] = []  # per question: response id -> overall (ok judgments)


def _cmp(a, b) -> float:
    return 0.5 if a is None or b is None or a == b else float(a > b)


def _any_mass_score(j) -> float | None:
    """A distributional judgment's expected score even when its label mass was too low."""
    if j.ok:
        return j.overall
    vals = []
    for dist in (j.distributions or {}).values():
        try:
            if not dist:
                return None
            vals.append(sum(float(k) * p for k, p in dist.items()))
        except ValueError:
            return None
    return sum(vals) / len(vals) if vals else None


def _any_mass_flip(v) -> list[float]:
    """Whether a verdict followed the position, read off its label probabilities even when their
    mass was too low for a judgment (a small judge's bias is still visible there)."""
    if v.ok:
        return [float(not v.consistent)]
    if not v.probs_ab or not v.probs_ba:
        return []
    return [float(max(v.probs_ab, key=v.probs_ab.get) == max(v.probs_ba, key=v.probs_ba.get))]


def evaluate_judge(judge, items: list[Item], compare: bool = True) -> tuple[dict, _Per]:
    per = _Per()
    n_judged = n_failed = 0
    t_score = t_cmp = 0.0
    n_verdicts = n_verdict_failed = 0
    failures: dict[str, int] = {}
    for it in items:
        t0 = time.perf_counter()
        js = judge.score(it.sample, [ResponseView(a.response_id, a.text) for a in it.answers])
        t_score += time.perf_counter() - t0
        n_judged += len(js)
        by = {j.response_id: j for j in js}
        for j in js:
            if not j.ok:
                n_failed += 1
                failures[j.failure or "other"] = failures.get(j.failure or "other", 0) + 1
        ok = {rid: j.overall for rid, j in by.items() if j.ok}
        anym = {rid: _any_mass_score(j) for rid, j in by.items()}
        per.scores.append(ok)
        if it.answers[0].correct is None:
            continue
        a = {(x.correct, x.long): x.response_id for x in it.answers}
        pairs = [(a[(True, lg)], a[(False, lg)]) for lg in (False, True)]
        per.pairs.append([_cmp(ok.get(c), ok.get(w)) for c, w in pairs])
        per.pairs_any.append([_cmp(anym.get(c), anym.get(w)) for c, w in pairs])
        words = {x.response_id: len(x.text.split()) for x in it.answers}
        per.slopes.append([(ok[a[(c, True)]] - ok[a[(c, False)]]) / (words[a[(c, True)]] - words[a[(c, False)]])
                           for c in (True, False) if a[(c, True)] in ok and a[(c, False)] in ok])
        if compare:
            right, wrong = (next(x for x in it.answers if x.correct is c and not x.long) for c in (True, False))
            t0 = time.perf_counter()
            v = judge.compare(it.sample, ResponseView(right.response_id, right.text),
                              ResponseView(wrong.response_id, wrong.text))
            t_cmp += time.perf_counter() - t0
            n_verdicts += 1
            per.flips_any.append(_any_mass_flip(v))
            if not v.ok:
                n_verdict_failed += 1
                per.flips.append([])
                per.verdict_right.append([])
            else:
                per.flips.append([float(not v.consistent)])
                per.verdict_right.append([float(v.consistent and v.preferred == right.response_id)])
    stats = {
        "judgments": n_judged, "failure_rate": round(n_failed / n_judged, 4) if n_judged else None,
        "failures_by_cause": failures, "judgments_per_s": round(n_judged / t_score, 3) if t_score else None,
        "verdicts": n_verdicts, "verdict_failure_rate": round(n_verdict_failed / n_verdicts, 4) if n_verdicts else None,
        "verdicts_per_s": round(n_verdicts / t_cmp, 3) if t_cmp else None,
    }
    return stats, per


def _mean_flat(rows) -> float | None:
    v = [x for r in rows for x in r]
    return float(np.mean(v)) if v else None


def figures(per: _Per, ref: _Per | None, idx) -> dict:
    """The judge's figures on the questions `idx` (the bootstrap resamples them)."""
    out = {"pairwise_accuracy": _mean_flat([per.pairs[i] for i in idx]) if per.pairs else None,
           "pairwise_accuracy_any_mass": _mean_flat([per.pairs_any[i] for i in idx]) if per.pairs_any else None,
           "position_bias": _mean_flat([per.flips[i] for i in idx]) if per.flips else None,
           "position_bias_any_mass": _mean_flat([per.flips_any[i] for i in idx]) if per.flips_any else None,
           "verdict_accuracy": _mean_flat([per.verdict_right[i] for i in idx]) if per.verdict_right else None}
    slope = _mean_flat([per.slopes[i] for i in idx]) if per.slopes else None
    out["length_bias_per_10_words"] = 10 * slope if slope is not None else None
    if ref is not None:
        x, y = [], []
        for i in idx:
            for rid, s in per.scores[i].items():
                if rid in ref.scores[i]:
                    x.append(s)
                    y.append(ref.scores[i][rid])
        out["kendall_tau"] = kendall_tau_b(x, y)
    return out


def agreement(names: list[str], pers: list[_Per]) -> list[dict]:
    """Between every two judges: Kendall tau of their scores, and how often they order two answers
    to the same question the same way (pairs either judge ties are left out)."""
    rows = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            x, y, same, n = [], [], 0, 0
            for sa, sb in zip(pers[a].scores, pers[b].scores):
                common = sorted(set(sa) & set(sb))
                x += [sa[r] for r in common]
                y += [sb[r] for r in common]
                for i in range(len(common)):
                    for j in range(i + 1, len(common)):
                        da, db = sa[common[i]] - sa[common[j]], sb[common[i]] - sb[common[j]]
                        if da and db:
                            n += 1
                            same += (da > 0) == (db > 0)
            tau = kendall_tau_b(x, y)
            rows.append({"a": names[a], "b": names[b], "kendall_tau": round(tau, 4) if tau is not None else None,
                         "pair_agreement": round(same / n, 4) if n else None, "pairs": n, "answers": len(x)})
    return rows


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


# --------------------------------------------------------------------------- the command


def eval_judge_config(entry, base_cfg):
    """(label, JudgeConfig to build, loopback server or None) for one judge_eval.judges entry."""
    from vpref.config import JudgeConfig
    from vpref.judges.registry import judge_identity

    data = entry.model_dump(exclude={"name", "loopback"})
    server = None
    if entry.loopback:
        from vpref.judges.engines import model_name, model_path
        from vpref.judges.engines.hf import ChatLM
        from vpref.judges.engines.loopback import ModelServer

        lm = ChatLM.load(model_path(entry.model), entry.dtype)
        server = ModelServer(lm, model_name=model_name(entry.model))
        data.update(backend="openai", api_base=server.base_url, api_prefill="continue", api_cache_dir=None,
                    model=model_name(entry.model))
    cfg = JudgeConfig.model_validate(data)
    label = entry.name or judge_identity(cfg)[0] + (" (loopback HTTP)" if entry.loopback else "")
    return label, cfg, server


def run_judge_eval(cfg) -> dict:
    """Measure every judge of `cfg.judge_eval`; writes the JSON, table and plot to its `out`."""
    from vpref.config import JudgeConfig
    from vpref.data.manifest import load_manifest
    from vpref.judges.registry import make_judge

    jc = cfg.judge_eval
    out = Path(jc.out)
    out.mkdir(parents=True, exist_ok=True)
    if jc.answers_from:
        items = build_items(jc.answers_from, jc.max_questions)
        source = f"responses of the build {jc.answers_from} (no ground truth)"
    else:
        manifest = load_manifest(getattr(cfg.data, jc.split), cfg.data.root)
        items = world_items(manifest.samples, jc.max_questions, jc.seed)
        source = f"synthetic world, {jc.split} split ({getattr(cfg.data, jc.split)})"
    if not items:
        raise ValueError(f"judge-eval found no usable questions in the {source}: the synthetic world's manifests "
                         "(with answers, captions, families) or judge_eval.answers_from=<build folder> are needed")
    truth = items[0].answers[0].correct is not None
    log(f"judge-eval: {len(items)} questions, {sum(len(i.answers) for i in items)} answers from the {source}")
    ref_per = None
    if truth:
        ref = make_judge(JudgeConfig(kind="reference"))
        _, ref_per = evaluate_judge(ref, items, compare=False)
    results, pers, names = [], [], []
    for entry in jc.judges:
        label, jcfg, server = eval_judge_config(entry, cfg)
        try:
            t0 = time.perf_counter()
            judge = make_judge(jcfg)
            load_s = time.perf_counter() - t0
            log(f"judge-eval: {label} ...")
            stats, per = evaluate_judge(judge, items, compare=jc.compare and truth)
            engine = getattr(judge, "lm", None)
            if engine is not None and getattr(engine, "stats", None):
                stats["engine_stats"] = dict(engine.stats)
                n = stats["judgments"] + 2 * stats["verdicts"]
                stats["sequences_per_judgment"] = round(engine.stats.get("sequences", 0) / n, 3) if n else None
            if engine is not None and getattr(engine, "totals", None) is not None:
                t = engine.totals
                stats["usage"] = {"requests": t.requests, "cache_hits": t.cache_hits, "input_tokens": t.input_tokens,
                                  "output_tokens": t.output_tokens, "cost_usd": round(t.cost_usd, 6)}
        finally:
            if server is not None:
                server.shutdown()
        idx = list(range(len(items)))
        point = _round(figures(per, ref_per, idx)) if truth else {}
        rng = np.random.default_rng(jc.seed)
        boots = [figures(per, ref_per, rng.integers(0, len(items), len(items))) for _ in range(jc.bootstrap)] if truth else []
        intervals = {f"{k}_ci": _interval([b[k] for b in boots]) for k in point if boots}
        results.append({"name": label, "kind": jcfg.kind, "judge": judge.name, "rubric_version": judge.rubric_version,
                        "mode": jcfg.mode if jcfg.kind == "llm" else None, "backend": jcfg.backend,
                        "load_s": round(load_s, 2), **point, **intervals, **stats})
        names.append(label)
        pers.append(per)
        log(f"judge-eval: {label}: " + ", ".join(f"{k} {results[-1].get(k)}" for k in
                                                  ("pairwise_accuracy", "kendall_tau", "failure_rate", "judgments_per_s")))
    report = {"source": source, "questions": len(items), "answers": sum(len(i.answers) for i in items),
              "bootstrap": jc.bootstrap, "judges": results, "agreement": agreement(names, pers)}
    (out / "judge_eval.json").write_text(json.dumps(report, indent=2))
    (out / "judge_eval.md").write_text(markdown(report))
    plot(report, out / "judge_eval.png")
    return report


def _ci(r: dict, key: str, digits: int = 2) -> str:
    v, ci = r.get(key), r.get(f"{key}_ci")
    if v is None:
        return "-"
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [f"Judges on {report['questions']} questions ({report['answers']} answers) of the {report['source']}; "
             f"95% bootstrap intervals over questions ({report['bootstrap']} resamples).", "",
             "| judge | pairwise accuracy | Kendall τ vs reference | position bias | length bias (per 10 words) "
             "| failure rate | judgments/s |", "|---|---|---|---|---|---|---|"]
    for r in report["judges"]:
        fr = f"{r['failure_rate']:.1%}" if r.get("failure_rate") is not None else "-"
        lines.append(f"| {r['name']} | {_ci(r, 'pairwise_accuracy')} | {_ci(r, 'kendall_tau')} | "
                     f"{_ci(r, 'position_bias')} | {_ci(r, 'length_bias_per_10_words', 3)} | {fr} | "
                     f"{r.get('judgments_per_s') or '-'} |")
    low = [r for r in report["judges"] if r.get("failure_rate") or r.get("verdict_failure_rate")]
    if low:
        lines += ["", "Read at any label mass (the distributions of low-mass failures too; not judgments, a "
                  "diagnostic of what a weak judge leans to):", "",
                  "| judge | failed judgments | failed verdicts | pairwise accuracy, any mass "
                  "| position bias, any mass |", "|---|---|---|---|---|"]
        for r in low:
            vf = f"{r['verdict_failure_rate']:.1%}" if r.get("verdict_failure_rate") is not None else "-"
            jf = f"{r['failure_rate']:.1%}" if r.get("failure_rate") is not None else "-"
            lines.append(f"| {r['name']} | {jf} | {vf} | {_ci(r, 'pairwise_accuracy_any_mass')} | "
                         f"{_ci(r, 'position_bias_any_mass')} |")
    if report["agreement"]:
        lines += ["", "| judges | Kendall τ | same order of two answers | pairs |", "|---|---|---|---|"]
        lines += [f"| {a['a']} vs {a['b']} | {a['kendall_tau']} | {a['pair_agreement']} | {a['pairs']} |"
                  for a in report["agreement"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["judges"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.6 * len(rows) + 1.8), sharey=True)
    y = np.arange(len(rows))
    for ax, key, title, ref in ((axes[0], "pairwise_accuracy", "pairwise accuracy", 0.5),
                                (axes[1], "kendall_tau", "Kendall τ vs reference", 0.0)):
        v = [r.get(key) if r.get(key) is not None else np.nan for r in rows]
        err = np.array([[v[i] - r[f"{key}_ci"][0], r[f"{key}_ci"][1] - v[i]] if r.get(f"{key}_ci") else [0, 0]
                        for i, r in enumerate(rows)]).T
        ax.barh(y, v, xerr=err, color="tab:blue", alpha=0.7, capsize=3)
        ax.axvline(ref, color="grey", ls="--", lw=1)
        ax.set_title(title)
    axes[0].set_yticks(y, [r["name"] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
