"""Alignment with a distilled judge (issue 10): rounds 2-3 judged by a reward model trained on
round 1's reference-judge labels, beside the run the reference judge judges throughout.

    python benchmarks/alignment_distill.py --seeds 0,1 --out benchmarks/results/alignment_distill.json

For each seed the SFT start is the alignment benchmark's (same members, same folder layout under
--work, so its checkpoints are reused when present), and both variants are real `vpref run`s:

* reference          the demo defaults (`benchmarks/alignment.py`'s iter_w2s_alpha_judge)
* distilled          distill.enabled: round 1 judged by the reference judge, a reward model
                     (rm.* below) trained on its judgments, rounds 2-3 judged by it; the reference
                     judge audits `--audit` questions of each distilled round (agreement recorded)

Evaluation and the alpha search use the reference judge in both.  The policy gain is the last
round's test QA accuracy (and judge score) minus round 0's, with a bootstrap interval over the
test questions (per seed, and pooled over seeds); the distilled-minus-reference difference is a
paired bootstrap over the same questions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from alignment import VARIANTS, summarise  # noqa: E402

from vpref.config import load_config  # noqa: E402
from vpref.loop import run  # noqa: E402
from vpref.train.sft import run_sft  # noqa: E402
from vpref.utils import quiet_libraries  # noqa: E402

REFERENCE = "iter_w2s_alpha_judge"


def distilled(audit: int, rm: list[str]) -> list[str]:
    return VARIANTS[REFERENCE] + ["distill.enabled=true", "distill.teacher_rounds=1",
                                  f"distill.audit_samples={audit}"] + rm


def per_question(run_dir: Path, t: int) -> dict[str, tuple]:
    """{question id: (correct or None, judge score)} of round t's evaluation."""
    rows = [json.loads(x) for x in (run_dir / f"round_{t}" / "eval_answers.jsonl").read_text().splitlines()]
    return {r["id"]: (r["correct"], r["judge"]) for r in rows}


def gains(run_dir: Path, last: int) -> dict[str, np.ndarray]:
    """Per-question gain (last round - round 0): accuracy on QA questions, judge score on all."""
    a, b = per_question(run_dir, 0), per_question(run_dir, last)
    ids = sorted(set(a) & set(b))
    qa = [i for i in ids if a[i][0] is not None and b[i][0] is not None]
    return {"accuracy": np.array([float(b[i][0]) - float(a[i][0]) for i in qa]), "accuracy_ids": qa,
            "judge": np.array([b[i][1] - a[i][1] for i in ids if a[i][1] is not None and b[i][1] is not None])}


def bootstrap(samples: list[np.ndarray], n: int = 2000, seed: int = 0) -> dict:
    """Mean over seeds of the mean per-question value, with a 95% percentile interval from
    resampling questions within each seed."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([s.mean() for s in samples]))
    reps = [np.mean([s[rng.integers(0, len(s), len(s))].mean() for s in samples]) for _ in range(n)]
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return {"mean": round(point, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "questions": [int(len(s)) for s in samples]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-alignment"), help="folder for the runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "alignment_distill.json"))
    ap.add_argument("--audit", type=int, default=100, help="questions the reference judge audits per RM round")
    ap.add_argument("--rm", action="append", default=[], metavar="KEY=VALUE",
                    help="reward model settings (default: the tiny video RM from the strong SFT member)")
    ap.add_argument("--variants", default="reference,distilled")
    args = ap.parse_args()
    quiet_libraries()
    work = Path(args.work)
    results: dict = {"seeds": [int(s) for s in args.seeds.split(",")], "runs": {}, "variants": {}}
    if Path(args.out).is_file():  # resume: finished runs are skipped by vpref itself
        results = {**json.loads(Path(args.out).read_text()), "seeds": results["seeds"]}
    for seed in results["seeds"]:
        sft_dir = work / f"seed{seed}" / "sft"
        members = (f"sft.members=[{{name: policy, size: 1m, steps: 100, seed: {seed}}}, "
                   f"{{name: strong, size: 1m, steps: 300, seed: {seed + 1}, init_from: policy}}, "
                   f"{{name: noisy, size: 1m, steps: 150, label_noise: 0.3, seed: {seed + 2}}}]")
        base = [f"run.seed={seed}", f"sft.out={sft_dir}", members, "ray.include_dashboard=false"]
        cfg = load_config(None, base)
        if not all((sft_dir / m.name / "model.safetensors").is_file() for m in cfg.sft.members):
            run_sft(cfg)
        zoo = [f"zoo.{i}.path={sft_dir / m}" for i, m in enumerate(("policy", "strong", "noisy"))]
        rm = args.rm or [f"rm.backbone={sft_dir / 'strong'}"]
        for name in args.variants.split(","):
            extra = VARIANTS[REFERENCE] if name == "reference" else distilled(args.audit, rm)
            out = work / f"seed{seed}" / ("distilled" if name == "distilled" else REFERENCE)
            t0 = time.perf_counter()
            metrics = run(load_config(None, base + zoo + extra + [f"run.out_dir={out}",
                                                                  f"run.name=align-{name}-s{seed}"]))
            state = json.loads((out / "state.json").read_text())["rounds"]
            rows = [{"round": r["round"], "accuracy": r["accuracy"], "judge_score": r["judge_score"],
                     "mean_words": r["mean_length"], "alpha": r.get("alpha"), "pairs": r.get("pairs"),
                     "judge": (state.get(str(r["round"]), {}).get("data") or {}).get("judge"),
                     "audit": state.get(str(r["round"]), {}).get("audit"),
                     "rm": {k: v for k, v in (state.get(str(r["round"]), {}).get("rm") or {}).items()
                            if k in ("checkpoint", "heldout_accuracy", "calibration", "seconds", "data")} or None}
                    for r in metrics["rounds"]]
            entry = {"rounds": rows, "run_dir": str(out), "seconds": round(time.perf_counter() - t0, 1)}
            if Path(args.out).is_file():  # another invocation (other variants, in parallel) may have written
                results["variants"] = json.loads(Path(args.out).read_text()).get("variants", {})
            results["variants"].setdefault(name, {})[str(seed)] = entry
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))
            print(f"seed {seed} {name}: " + ", ".join(f"r{r['round']} acc {r['accuracy']:.3f} judge "
                                                      f"{r['judge_score']:.3f}" for r in rows), flush=True)
    results["variants"] = json.loads(Path(args.out).read_text()).get("variants", results["variants"])
    results["summary"] = summarise({"variants": results["variants"]})
    results["gain"] = gain_table(results)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results["gain"], indent=2))
    return 0


def gain_table(results: dict) -> dict:
    """Policy gain per variant (bootstrap over test questions) and distilled - reference (paired)."""
    out, per = {}, {}
    for name, by_seed in results["variants"].items():
        per[name] = {}
        for seed, r in by_seed.items():
            last = max(x["round"] for x in r["rounds"])
            per[name][seed] = gains(Path(r["run_dir"]), last)
        out[name] = {k: bootstrap([g[k] for g in per[name].values()]) for k in ("accuracy", "judge")}
        out[name]["per_seed"] = {s: {k: bootstrap([g[k]]) for k in ("accuracy", "judge")} for s, g in per[name].items()}
    if {"reference", "distilled"} <= set(per):
        seeds = sorted(set(per["reference"]) & set(per["distilled"]))
        diff = {}
        for k in ("accuracy", "judge"):
            # paired: same SFT start and the same test questions in both runs of a seed
            diff[k] = bootstrap([per["distilled"][s][k] - per["reference"][s][k] for s in seeds
                                 if len(per["distilled"][s][k]) == len(per["reference"][s][k])])
        out["distilled_minus_reference"] = diff
    return out


if __name__ == "__main__":
    raise SystemExit(main())
