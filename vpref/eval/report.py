"""The run report: metrics.json (machine-readable, keys in docs/metrics.md), report.md (tables
across rounds, each figure with its bootstrap 95% interval, the judge named above each table) and
PNG plots with error bars: scores.png, suites.png, dpo.png."""

from __future__ import annotations

import json
from pathlib import Path

from vpref.eval.stats import Estimate, fmt
from vpref.eval.suites import VCGPT_DIMENSIONS
from vpref.eval.tables import suite_tables


def _ci(value, ci) -> Estimate:
    lo, hi = ci or (None, None)
    return Estimate(value, lo, hi, 0)


def _row(r: dict) -> str:
    acc = r["eval"]["accuracy"]
    aci = r["eval"].get("accuracy_ci95", {})
    j = r["eval"]["judge"]
    alpha = r.get("alpha")
    return (f"| {r['round']} | {fmt(_ci(acc.get('qa', 0), aci.get('qa')), 3)} | {acc.get('describe', 0):.3f} | "
            f"{acc.get('all', 0):.3f} | {fmt(_ci(j['overall'], j.get('overall_ci95')), 3)} | "
            f"{r['eval']['length']['words']:.1f} | {r.get('pairs', '-')} | "
            f"{'-' if alpha is None else alpha} | "
            f"{'-' if r.get('dpo_accuracy') is None else format(r['dpo_accuracy'], '.2f')} |")


def table(rounds: list[dict]) -> str:
    head = ("| round | QA accuracy | describe exact | all accuracy | judge score | mean words | pairs | alpha "
            "| DPO pref. acc. (last epoch) |\n|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [_row(r) for r in rounds])


def family_table(rounds: list[dict]) -> str:
    fams = [f for f in rounds[0]["eval"]["accuracy"] if f not in ("qa", "all")]
    head = "| round | " + " | ".join(fams) + " |\n|---|" + "---|" * len(fams)
    return "\n".join([head] + [f"| {r['round']} | " + " | ".join(f"{r['eval']['accuracy'].get(f, 0):.3f}" for f in fams)
                               + " |" for r in rounds])


def write_report(run_dir: str | Path, metrics: dict) -> Path:
    run_dir = Path(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    rounds = metrics["rounds"]
    text = [f"# vpref run `{metrics.get('name', '')}`", "",
            f"Evaluated on the {metrics.get('split', 'test')} split ({rounds[0]['eval']['questions']} questions); "
            f"judge `{rounds[0]['eval']['judge']['name']}` ({rounds[0]['eval']['judge']['rubric_version']}); "
            "bootstrap 95% intervals in brackets. Round 0 is the SFT start.", "", table(rounds), "",
            "Exact-match accuracy per question family:", "", family_table(rounds), "",
            "![scores per round](scores.png)", ""]
    suites = suite_tables(rounds)
    if suites:
        text += ["## Evaluation suites", "", suites, "", "![suites per round](suites.png)", ""]
    text += ["![DPO training curves](dpo.png)", ""]
    (run_dir / "report.md").write_text("\n".join(text))
    plot(run_dir, metrics)
    return run_dir / "report.md"


def plot(run_dir: Path, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = metrics["rounds"]
    xs = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for key, style, label in (("qa", "o-", "QA accuracy"), ("all", "s--", "all (incl. describe)")):
        errorbars(axes[0], xs, [_ci(r["eval"]["accuracy"].get(key, 0), r["eval"].get("accuracy_ci95", {}).get(key))
                                for r in rounds], style, label=label)
    axes[0].set_title("exact-match accuracy (95% CI)")
    axes[0].legend(fontsize=7)
    errorbars(axes[1], xs, [_ci(r["eval"]["judge"]["overall"], r["eval"]["judge"].get("overall_ci95"))
                            for r in rounds], "o-", color="C2")
    axes[1].set_title("build judge score (1-5, 95% CI)")
    axes[2].plot(xs, [r["eval"]["length"]["words"] for r in rounds], "o-", color="C3")
    axes[2].set_title("mean answer length (words)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(xs)
    fig.tight_layout()
    fig.savefig(run_dir / "scores.png", dpi=80)
    plt.close(fig)

    if any((r["eval"].get("suites")) for r in rounds):
        plot_suites(rounds, run_dir / "suites.png")

    trained = [r for r in rounds if r.get("dpo_curve")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for r in trained:
        steps = [m["step"] for m in r["dpo_curve"]]
        for ax, key in zip(axes, ("loss", "rewards/margin", "rewards/accuracy")):
            ax.plot(steps, [m[key] for m in r["dpo_curve"]], label=f"round {r['round']}")
            ax.set_title(key)
            ax.set_xlabel("step")
    if trained:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "dpo.png", dpi=80)
    plt.close(fig)


def errorbars(ax, xs, estimates, style="o-", **kw) -> None:
    """Points with their 95% interval as error bars (points without a value are left out)."""
    pts = [(x, e) for x, e in zip(xs, estimates) if e is not None and e.value is not None]
    if not pts:
        return
    x = [p[0] for p in pts]
    y = [p[1].value for p in pts]
    lo = [p[1].value - p[1].lo if p[1].lo is not None else 0 for p in pts]
    hi = [p[1].hi - p[1].value if p[1].hi is not None else 0 for p in pts]
    ax.errorbar(x, y, yerr=[lo, hi], fmt=style, capsize=3, **kw)


def plot_suites(rounds: list[dict], path: Path) -> None:
    """Video-ChatGPT dimensions and mean, zero-shot accuracy per set, and the win rates, per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds]
    suites = [r["eval"].get("suites") or {} for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for k, dim in enumerate(VCGPT_DIMENSIONS):
        errorbars(axes[0], [x + 0.04 * (k - 2) for x in xs],
                  [Estimate.from_json((s.get("videochatgpt") or {}).get("dimensions", {}).get(dim)) for s in suites],
                  "o:", label=dim, alpha=0.7)
    errorbars(axes[0], xs, [Estimate.from_json((s.get("videochatgpt") or {}).get("mean")) for s in suites], "ks-",
              label="mean of five")
    axes[0].set_title("Video-ChatGPT (0-5)")
    names = sorted({n for s in suites for n in (s.get("zeroshot") or {}).get("sets", {})})
    for name in names:
        errorbars(axes[1], xs, [Estimate.from_json((s.get("zeroshot") or {}).get("sets", {}).get(name, {})
                                                   .get("accuracy")) for s in suites], "o-", label=name)
    axes[1].set_title("zero-shot QA accuracy")
    for key, style in (("win_rate", "o-"), ("lc_win_rate", "s--")):
        errorbars(axes[2], xs, [Estimate.from_json((s.get("winrate") or {}).get(key)) for s in suites], style,
                  label=key.replace("_", " "))
    axes[2].axhline(0.5, color="grey", lw=0.8)
    axes[2].set_title("win rate vs baseline")
    judge = next((s["judge"]["name"] for s in suites if s.get("judge")), "?")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(xs)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(f"suites, judge {judge}; error bars: bootstrap 95% intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
