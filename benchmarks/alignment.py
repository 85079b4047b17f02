"""Alignment benchmark (issue 4): does AI feedback improve the policy, and which parts matter?

    python benchmarks/alignment.py --seeds 0,1,2 --out benchmarks/results/alignment.json

On the synthetic world, for each seed (SFT initialisation, sampling, each round's questions):

* SFT start (round 0)
* one round of DPO                 = round 1 of the iterative run without extrapolation
* iterative DPO, no extrapolation  (reference := previous policy, alpha 0)
* Iter-W2S, alpha fixed            (reference := previous policy, alpha 0.3)
* Iter-W2S, alpha chosen by judge  (alpha from {0, 0.3, 0.6} by the dev judge score; the demo default)
* Iter-W2S, reference kept at SFT  (alpha 0.3; the "no reference update" ablation)
* under-trained DPO (1 epoch), alpha 0; alpha fixed at 1.0; alpha chosen by the judge from {0, 0.5, 1, 2}

Each run is a real `vpref run` (Ray Train DPO included); test accuracy and judge score per round
go to JSON.  Then every round's policy of every run goes through the evaluation suites with the
reference judge (`--evaluate`, on by default; `--evaluate-only` skips training): Video-ChatGPT's
five dimensions, zero-shot QA, caption-grounded scores and the win rate against the seed's SFT
start, each with a bootstrap 95% interval; and for each extrapolated variant against its alpha = 0
twin, paired differences on the same questions (accuracy, Video-ChatGPT mean) and a head-to-head
win rate of the final policies.  A PNG plots the figures per round with their intervals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpref.config import load_config  # noqa: E402
from vpref.loop import run  # noqa: E402
from vpref.train.sft import run_sft  # noqa: E402
from vpref.utils import quiet_libraries  # noqa: E402

VARIANTS = {
    "iterative_dpo": ["loop.alpha=0.0", "loop.alpha_grid=null"],
    "iter_w2s_alpha_fixed": ["loop.alpha=0.3", "loop.alpha_grid=null"],
    "iter_w2s_alpha_judge": [],  # the defaults: alpha grid picked on dev
    "iter_w2s_ref_sft": ["loop.alpha=0.3", "loop.alpha_grid=null", "loop.reference=initial"],
    # Under-trained DPO (one epoch instead of three), where ExPO is expected to help most: the
    # extrapolation should recover part of the training that was not done.
    "under_dpo": ["dpo.epochs=1", "loop.alpha=0.0", "loop.alpha_grid=null"],
    "under_w2s_alpha_fixed": ["dpo.epochs=1", "loop.alpha=1.0", "loop.alpha_grid=null"],
    "under_w2s_alpha_judge": ["dpo.epochs=1", "loop.alpha_grid=[0.0, 0.5, 1.0, 2.0]"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-alignment"), help="folder for the runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "alignment.json"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--evaluate-only", action="store_true", help="only run the suites on finished runs")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of the suites' intervals")
    args = ap.parse_args()
    quiet_libraries()
    work = Path(args.work)
    results: dict = {"variants": {}, "seeds": [int(s) for s in args.seeds.split(",")]}
    if Path(args.out).is_file():  # resume a partial benchmark: finished runs are skipped by vpref itself
        results = json.loads(Path(args.out).read_text())
    variants = args.variants.split(",")
    for seed in [] if args.evaluate_only else results["seeds"]:
        base, zoo = seed_config(work, seed)
        cfg = load_config(None, base)
        if not all((Path(cfg.sft.out) / m.name / "model.safetensors").is_file() for m in cfg.sft.members):
            run_sft(cfg)
        for name in variants:
            out = work / f"seed{seed}" / name
            t0 = time.perf_counter()
            metrics = run(load_config(None, base + zoo + VARIANTS[name] + [f"run.out_dir={out}",
                                                                         f"run.name=align-{name}-s{seed}",
                                                                         "eval.suites=[]"]))
            rows = [{"round": r["round"], "accuracy": r["accuracy"], "judge_score": r["judge_score"],
                     "mean_words": r["mean_length"], "alpha": r.get("alpha"), "pairs": r.get("pairs"),
                     "policy": r["policy"]} for r in metrics["rounds"]]
            results["variants"].setdefault(name, {})[str(seed)] = {"rounds": rows,
                                                                   "seconds": round(time.perf_counter() - t0, 1)}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
            print(f"seed {seed} {name}: " + ", ".join(f"r{r['round']} acc {r['accuracy']:.3f} judge "
                                                      f"{r['judge_score']:.3f}" for r in rows), flush=True)
    collect_runs(results, work, variants)
    results["summary"] = summarise(results)
    Path(args.out).write_text(json.dumps(results, indent=2))
    from alignment_suites import compare, evaluate_runs, plot_suites, suite_summary  # (next to this file)

    evaluate_runs(results, work, variants, args.bootstrap, Path(args.out), seed_config)
    results["suite_summary"] = suite_summary(results)
    results["comparisons"] = compare(results, work, seed_config)
    Path(args.out).write_text(json.dumps(results, indent=2))
    plot(results, Path(args.out).with_suffix(".png"))
    plot_suites(results, Path(args.out).with_name(Path(args.out).stem + "_suites.png"))
    print(json.dumps({"summary": results["summary"], "comparisons": results["comparisons"]}, indent=2))
    return 0


def collect_runs(results: dict, work: Path, variants: list[str]) -> None:
    """Per-round rows of finished runs not yet in `results` (runs trained by an earlier invocation)."""
    for seed in results["seeds"]:
        for name in variants:
            f = work / f"seed{seed}" / name / "metrics.json"
            if f.is_file() and str(seed) not in results["variants"].get(name, {}):
                rounds = json.loads(f.read_text())["rounds"]
                results["variants"].setdefault(name, {})[str(seed)] = {"rounds": [
                    {"round": r["round"], "accuracy": r["accuracy"], "judge_score": r["judge_score"],
                     "mean_words": r["mean_length"], "alpha": r.get("alpha"), "pairs": r.get("pairs"),
                     "policy": r["policy"]} for r in rounds]}


def seed_config(work: Path, seed: int) -> tuple[list[str], list[str]]:
    """(--set overrides of the seed's runs, the zoo's paths)."""
    sft_dir = work / f"seed{seed}" / "sft"
    members = (f"sft.members=[{{name: policy, size: 1m, steps: 100, seed: {seed}}}, "
               f"{{name: strong, size: 1m, steps: 300, seed: {seed + 1}, init_from: policy}}, "
               f"{{name: noisy, size: 1m, steps: 150, label_noise: 0.3, seed: {seed + 2}}}]")
    base = [f"run.seed={seed}", f"sft.out={sft_dir}", members, "ray.include_dashboard=false"]
    zoo = [f"zoo.{i}.path={sft_dir / m}" for i, m in enumerate(("policy", "strong", "noisy"))]
    return base, zoo


def summarise(results: dict) -> dict:
    """Mean and spread over seeds, per variant and round; 'one_round_dpo' is round 1 of iterative DPO."""
    out = {}
    for name, by_seed in results["variants"].items():
        rounds = sorted({r["round"] for s in by_seed.values() for r in s["rounds"]})
        out[name] = {}
        for t in rounds:
            acc = [r["accuracy"] for s in by_seed.values() for r in s["rounds"] if r["round"] == t]
            judge = [r["judge_score"] for s in by_seed.values() for r in s["rounds"] if r["round"] == t]
            out[name][t] = {"accuracy_mean": statistics.mean(acc), "accuracy_sd": statistics.pstdev(acc),
                            "judge_mean": statistics.mean(judge), "judge_sd": statistics.pstdev(judge),
                            "seeds": len(acc)}
    if "iterative_dpo" in out:
        out["sft_start"] = {0: out["iterative_dpo"][0]}
        out["one_round_dpo"] = {1: out["iterative_dpo"][1]}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, rows in results["summary"].items():
        if name in ("sft_start", "one_round_dpo"):
            continue
        xs = sorted(rows, key=int)
        for ax, key in zip(axes, ("accuracy", "judge")):
            ys = [rows[x][f"{key}_mean"] for x in xs]
            sd = [rows[x][f"{key}_sd"] for x in xs]
            ax.errorbar([int(x) for x in xs], ys, yerr=sd, marker="o", capsize=3, label=name)
    axes[0].set_title("test QA exact-match accuracy")
    axes[1].set_title("judge score (1-5)")
    for ax in axes:
        ax.set_xlabel("round (0 = SFT start)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
