"""The alignment benchmark's evaluation pass (used by alignment.py): every round's policy of every
finished run through the evaluation suites with the reference judge, then paired comparisons of
each extrapolated variant with its alpha = 0 twin on the same questions.

Per seed one data engine hosts the policy, one `SuiteRunner` holds the sets and the answer cache
(`<work>/seed<s>/suite-eval/`), so the SFT start's answers (the win rate's baseline) are made
once, and the head-to-head win rates read both policies' answers from the cache.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from vpref.config import load_config
from vpref.eval import stats
from vpref.eval.suites import VCGPT_DIMENSIONS

# (extrapolated variant, its alpha = 0 twin); the last row: does the third epoch matter at all
PAIRS = [("iter_w2s_alpha_judge", "iterative_dpo"), ("iter_w2s_alpha_fixed", "iterative_dpo"),
         ("under_w2s_alpha_fixed", "under_dpo"), ("under_w2s_alpha_judge", "under_dpo"),
         ("iterative_dpo", "under_dpo")]


def _rounds(work: Path, seed: int, variant: str) -> list[tuple[int, str]]:
    f = work / f"seed{seed}" / variant / "metrics.json"
    if not f.is_file():
        return []
    return [(r["round"], r["policy"]) for r in json.loads(f.read_text())["rounds"]]


def _label(variant: str, t: int) -> str:
    return "sft" if t == 0 else f"{variant}-r{t}"


def _eval_dir(work: Path, seed: int) -> Path:
    return work / f"seed{seed}" / "suite-eval"


def _cfg(work: Path, seed: int, seed_config, *extra):
    base, zoo = seed_config(work, seed)
    return load_config(None, base + zoo + [f"run.name=align-eval-s{seed}", f"run.out_dir={_eval_dir(work, seed)}",
                                           *extra])


def _compact(m: dict) -> dict:
    s = m.get("suites") or {}
    out = {"accuracy": {"value": m["accuracy"].get("qa"), "ci95": m["accuracy_ci95"].get("qa")},
           "words": m["length"]["words"], "judge": s.get("judge", {}).get("name")}
    if "videochatgpt" in s:
        out["videochatgpt"] = {**s["videochatgpt"]["dimensions"], "mean": s["videochatgpt"]["mean"]}
    if "zeroshot" in s:
        z = next(iter(s["zeroshot"]["sets"].values()))
        out["zeroshot"] = {"accuracy": z["accuracy"], "score": z["score"]}
    if "grounded" in s:
        g = next(iter(s["grounded"]["sets"].values()))
        out["grounded"] = {"score": g["score"], "share_ge3": g["share_ge3"]}
    if "winrate" in s and not s["winrate"].get("skipped"):
        w = s["winrate"]
        out["winrate"] = {k: w[k] for k in ("win_rate", "lc_win_rate", "wins", "losses", "ties", "identical")}
    return out


def evaluate_runs(results: dict, work: Path, variants: list[str], reps: int, out_path: Path, seed_config) -> None:
    """Fill results['suites'][seed][label] for every finished run's rounds (resumable)."""
    from vpref.build import DataEngine
    from vpref.cluster import init_ray
    from vpref.eval.evaluator import Evaluator, evaluate_round, suite_runner
    from vpref.loop import _split

    store = results.setdefault("suites", {})
    for seed in results["seeds"]:
        done = store.setdefault(str(seed), {})
        todo = [(_label(v, t), t, p) for v in variants for t, p in _rounds(work, seed, v) if t > 0]
        sft = next(((t, p) for v in variants for t, p in _rounds(work, seed, v) if t == 0), None)
        if sft:
            todo.insert(0, ("sft", *sft))
        todo = [x for x in todo if x[0] not in done]
        if not todo:
            continue
        cfg = _cfg(work, seed, seed_config, f"eval.bootstrap={reps}")
        edir = _eval_dir(work, seed)
        edir.mkdir(parents=True, exist_ok=True)
        rejects = edir / "rejects.jsonl"
        init_ray(cfg.ray)
        engine = DataEngine(cfg, edir / "_actors", members=["policy"])
        try:
            runner = suite_runner(cfg, edir, rejects)
            ev = Evaluator(engine, cfg, _split(cfg, "test", rejects), rejects, extra_videos=runner.videos)
            runner.drop_videos(ev.failed_videos, rejects)
            for label, t, path in todo:
                engine.reload_policy(path, version=t)
                m = evaluate_round(ev, runner, t, path, edir / label, None)
                done[label] = {"policy": path, **_compact(m)}
                out_path.write_text(json.dumps(results, indent=2))
                c = done[label]
                print(f"seed {seed} {label}: acc {c['accuracy']['value']:.3f}, Video-ChatGPT mean "
                      f"{stats.fmt(c['videochatgpt']['mean'])}, win rate {stats.fmt(c.get('winrate', {}).get('win_rate'), 3)}",
                      flush=True)
        finally:
            engine.shutdown()


# --------------------------------------------------------------------------- summaries


def suite_summary(results: dict) -> dict:
    """Per variant and round: the mean over seeds of each figure, its SD over seeds, and each seed's
    bootstrap interval."""
    keys = {"accuracy": ("accuracy",), "vcgpt_mean": ("videochatgpt", "mean"),
            **{f"vcgpt_{d}": ("videochatgpt", d) for d in VCGPT_DIMENSIONS},
            "zeroshot_accuracy": ("zeroshot", "accuracy"), "grounded_score": ("grounded", "score"),
            "win_rate": ("winrate", "win_rate"), "lc_win_rate": ("winrate", "lc_win_rate")}
    out: dict = {}
    for seed, labels in results.get("suites", {}).items():
        for label, m in labels.items():
            for key, path in keys.items():
                e = m
                for p in path:
                    e = (e or {}).get(p)
                if e and e.get("value") is not None:
                    out.setdefault(label, {}).setdefault(key, []).append((seed, e["value"], e.get("ci95")))
    summary: dict = {}
    for label, figs in out.items():
        summary[label] = {}
        for key, vals in figs.items():
            xs = [v for _, v, _ in vals]
            summary[label][key] = {"mean": statistics.mean(xs), "sd": statistics.pstdev(xs) if len(xs) > 1 else None,
                                   "seeds": {s: {"value": v, "ci95": ci} for s, v, ci in vals}}
    return summary


def _answers(folder: Path) -> dict[str, bool]:
    return {r["id"]: bool(r["correct"]) for r in map(json.loads, (folder / "eval_answers.jsonl").read_text().splitlines())
            if r["correct"] is not None and r["family"] != "describe"}


def _scores(folder: Path) -> dict[str, dict[str, float]]:
    out: dict = {}
    for r in map(json.loads, (folder / "eval_ratings.jsonl").read_text().splitlines()):
        if r["suite"] == "videochatgpt":
            out.setdefault(r["protocol"], {})[r["item_id"]] = r["value"]["score"] if r["ok"] else np.nan
    return out


def _paired(a: dict, b: dict, reps: int, seed: int) -> dict:
    """Paired bootstrap of mean(a) - mean(b) over the items both have."""
    ids = sorted(set(a) & set(b))
    x = np.array([float(a[i]) - float(b[i]) for i in ids])
    counts = stats.resample_counts(len(ids), reps, seed)
    lo, hi = np.quantile(counts @ x / len(ids), [0.025, 0.975])
    return {"value": float(x.mean()), "ci95": [float(lo), float(hi)], "n": len(ids)}


def _paired_vcgpt(a: dict, b: dict, reps: int, seed: int) -> dict:
    """Paired bootstrap of the difference of the Video-ChatGPT mean of five (items resampled per set,
    jointly for the two policies and the three dimensions of the generic set)."""
    sets = {}
    for dim, (proto, set_name) in VCGPT_DIMENSIONS.items():
        sets.setdefault(set_name, []).append(proto)
    reps_all, point = [], []
    for k, (set_name, protos) in enumerate(sets.items()):
        ids = sorted(set(a[protos[0]]) & set(b[protos[0]]))
        counts = stats.resample_counts(len(ids), reps, seed + k)
        for p in protos:
            d = np.array([a[p][i] - b[p][i] for i in ids])
            point.append(float(np.nanmean(d)))
            reps_all.append(stats.weighted_means(d, counts))
    lo, hi = np.nanquantile(np.mean(reps_all, axis=0), [0.025, 0.975])
    return {"value": float(np.mean(point)), "ci95": [float(lo), float(hi)]}


def compare(results: dict, work: Path, seed_config, reps: int = 2000) -> dict:
    """Each extrapolated variant against its alpha = 0 twin, final round, per seed: paired
    differences (QA accuracy, Video-ChatGPT mean) and the head-to-head win rate (reference judge,
    both orders; the twin is the baseline)."""
    from vpref.eval.judge import ReferenceSuiteJudge
    from vpref.eval.runner import SuiteRunner

    out = {}
    for a, b in PAIRS:
        rows = {}
        for seed, labels in results.get("suites", {}).items():
            # the final round each of the two runs reached
            ra = max((int(k.rsplit("-r", 1)[1]) for k in labels if k.startswith(f"{a}-r")), default=None)
            rb = max((int(k.rsplit("-r", 1)[1]) for k in labels if k.startswith(f"{b}-r")), default=None)
            if ra is None or rb is None or ra != rb:
                continue
            la, lb = _label(a, ra), _label(b, rb)
            edir = _eval_dir(work, int(seed))
            row = {"round": ra, "accuracy_diff": _paired(_answers(edir / la), _answers(edir / lb), reps, int(seed)),
                   "vcgpt_mean_diff": _paired_vcgpt(_scores(edir / la), _scores(edir / lb), reps, int(seed))}
            cfg = _cfg(work, int(seed), seed_config, "eval.suites=[winrate]",
                       f"eval.winrate_baseline={labels[lb]['policy']}", f"eval.bootstrap={reps}")
            runner = SuiteRunner(cfg, ReferenceSuiteJudge(), edir / "eval_cache")
            answers = runner.cache.get(labels[la]["policy"])
            base = runner.cache.get(labels[lb]["policy"])
            if all(k in answers and k in base for k in runner.asks):
                m, _ = runner.run(answers, base)
                w = m["winrate"]
                row["head_to_head"] = {k: w[k] for k in ("win_rate", "lc_win_rate", "wins", "losses", "ties",
                                                         "identical")}
            rows[seed] = row
        if rows:
            out[f"{a}_vs_{b}"] = rows
    return out


def plot_suites(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results.get("suite_summary") or {}
    if not summary:
        return
    variants = sorted({k.rsplit("-r", 1)[0] for k in summary if k != "sft"})
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    n_seeds = len(results.get("suites", {}))
    for j, v in enumerate(variants):
        for ax, key in zip(axes, ("accuracy", "vcgpt_mean", "win_rate")):
            xs, ys, lo, hi = [], [], [], []
            for t in range(0, 10):
                s = summary.get("sft" if t == 0 else f"{v}-r{t}", {}).get(key)
                if not s:
                    continue
                xs.append(t + 0.04 * (j - len(variants) / 2))
                ys.append(s["mean"])
                if n_seeds > 1:  # the spread over seeds
                    lo.append(s["sd"] or 0)
                    hi.append(s["sd"] or 0)
                else:  # the one seed's bootstrap interval
                    ci = next(iter(s["seeds"].values()))["ci95"] or [s["mean"], s["mean"]]
                    lo.append(s["mean"] - ci[0])
                    hi.append(ci[1] - s["mean"])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=v)
    for ax, title in zip(axes, ("test QA exact-match accuracy", "Video-ChatGPT mean of five (0-5)",
                                "win rate vs the SFT start")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round (0 = SFT start)")
    axes[2].axhline(0.5, color="grey", lw=0.8)
    axes[0].legend(fontsize=6)
    what = "SD over seeds" if n_seeds > 1 else "bootstrap 95% interval"
    fig.suptitle(f"alignment benchmark, reference judge; error bars: {what}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
