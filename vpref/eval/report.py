"""The run report: metrics.json (machine-readable), report.md (a table across rounds) and PNG
plots of scores per round and DPO training curves."""

from __future__ import annotations

import json
from pathlib import Path


def _row(r: dict) -> str:
    acc = r["eval"]["accuracy"]
    j = r["eval"]["judge"]
    alpha = r.get("alpha")
    return (f"| {r['round']} | {acc.get('qa', 0):.3f} | {acc.get('describe', 0):.3f} | {acc.get('all', 0):.3f} | "
            f"{j['overall'] if j['overall'] is None else format(j['overall'], '.3f')} | "
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
            f"judge `{rounds[0]['eval']['judge']['name']}` ({rounds[0]['eval']['judge']['rubric_version']}). "
            "Round 0 is the SFT start.", "", table(rounds), "", "Exact-match accuracy per question family:", "",
            family_table(rounds), "", "![scores per round](scores.png)", "", "![DPO training curves](dpo.png)", ""]
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
    axes[0].plot(xs, [r["eval"]["accuracy"].get("qa", 0) for r in rounds], "o-", label="QA accuracy")
    axes[0].plot(xs, [r["eval"]["accuracy"].get("all", 0) for r in rounds], "s--", label="all (incl. describe)")
    axes[0].set_title("exact-match accuracy")
    axes[0].legend(fontsize=7)
    axes[1].plot(xs, [r["eval"]["judge"]["overall"] or 0 for r in rounds], "o-", color="C2")
    axes[1].set_title("judge score (1-5)")
    axes[2].plot(xs, [r["eval"]["length"]["words"] for r in rounds], "o-", color="C3")
    axes[2].set_title("mean answer length (words)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(xs)
    fig.tight_layout()
    fig.savefig(run_dir / "scores.png", dpi=80)
    plt.close(fig)

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
