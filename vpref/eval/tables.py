"""Markdown tables of the suites, in the papers' layouts, every figure with its bootstrap 95%
interval and the judge (model, template/rule version) named above each table.

Input: `rounds`, a list of {"round": t, "eval": {"suites": <SuiteRunner.run metrics>}} (the
run's metrics.json rounds, or one entry per checkpoint for `vpref eval`).
"""

from __future__ import annotations

from vpref.eval.stats import fmt
from vpref.eval.suites import VCGPT_DIMENSIONS

DIM_HEADS = {"correctness": "Corr.", "detail": "Detail", "context": "Context", "temporal": "Temporal",
             "consistency": "Consist."}


def _suites(r: dict) -> dict:
    return (r.get("eval") or {}).get("suites") or {}


def _label(r: dict) -> str:
    return str(r.get("label", r.get("round")))


def _judge_line(rounds: list[dict], suite: str, what: str) -> str | None:
    have = [r for r in rounds if suite in _suites(r)]
    if not have:
        return None
    s = _suites(have[-1])
    return f"{what} -- judge `{s['judge']['name']}`, `{s[suite].get('version', '?')}`; bootstrap 95% intervals."


def videochatgpt_table(rounds: list[dict], head: str = "round") -> str | None:
    line = _judge_line(rounds, "videochatgpt", "Video-ChatGPT benchmark (integer 0-5; mean = mean of the five)")
    if line is None:
        return None
    cols = [DIM_HEADS[d] for d in VCGPT_DIMENSIONS] + ["Mean"]
    out = [line, "", f"| {head} | " + " | ".join(cols) + " | failed |", "|---" * (len(cols) + 2) + "|"]
    for r in rounds:
        m = _suites(r).get("videochatgpt")
        if not m:
            continue
        dims = m["dimensions"]
        failed = sum(d.get("failed", 0) for d in dims.values())
        out.append(f"| {_label(r)} | " + " | ".join(fmt(dims[d]) for d in VCGPT_DIMENSIONS) + f" | {fmt(m['mean'])} "
                   f"| {failed} |")
    last = _suites(rounds[-1]).get("videochatgpt") or {}
    ns = {d: v.get("n", 0) for d, v in last.get("dimensions", {}).items()}
    skipped = [f"{d}: {v['skipped']}" for d, v in last.get("dimensions", {}).items() if v.get("skipped")]
    out.append("")
    out.append(f"Items judged (last row): {', '.join(f'{d} {n}' for d, n in ns.items())}."
               + (f" Skipped: {'; '.join(skipped)}." if skipped else ""))
    return "\n".join(out)


def zeroshot_table(rounds: list[dict], head: str = "round") -> str | None:
    line = _judge_line(rounds, "zeroshot", "Zero-shot QA (accuracy = yes / (yes + no), %; score: mean integer 0-5)")
    if line is None:
        return None
    out = [line, "", f"| {head} | set | accuracy % | score | yes / no / neither | failed |", "|---|---|---|---|---|---|"]
    for r in rounds:
        for name, m in (_suites(r).get("zeroshot") or {}).get("sets", {}).items():
            out.append(f"| {_label(r)} | {name} | {fmt(m['accuracy'], 1, 100)} | {fmt(m['score'])} | "
                       f"{m['yes']} / {m['no']} / {m['neither']} | {m['failed']} |")
    return "\n".join(out)


def grounded_table(rounds: list[dict], head: str = "round") -> str | None:
    line = _judge_line(rounds, "grounded", "Caption-grounded scoring, LLaVA-Hound (1-5; the judge sees the caption)")
    if line is None:
        return None
    out = [line, "", f"| {head} | set | score | share >= 3 | failed | score if failures counted as 1 |",
           "|---|---|---|---|---|---|"]
    for r in rounds:
        for name, m in (_suites(r).get("grounded") or {}).get("sets", {}).items():
            out.append(f"| {_label(r)} | {name} | {fmt(m['score'])} | {fmt(m['share_ge3'], 3)} | "
                       f"{m['score'].get('failed', 0)} | {fmt(m['score_failures_as_1'])} |")
    return "\n".join(out)


def winrate_table(rounds: list[dict], head: str = "round") -> str | None:
    line = _judge_line(rounds, "winrate", "Win rate against the baseline, both orders (MT-Bench rule), "
                                          "(W + 0.5 T) / N; length-controlled as AlpacaEval 2")
    if line is None:
        return None
    base = next((_suites(r)["winrate"].get("baseline") for r in rounds if "winrate" in _suites(r)), None)
    out = [line + f" Baseline: `{base}`.", "",
           f"| {head} | win rate | LC win rate | W / L / T | identical | dropped | mean chars model / baseline |",
           "|---|---|---|---|---|---|---|"]
    for r in rounds:
        m = _suites(r).get("winrate")
        if not m:
            continue
        if m.get("skipped"):
            out.append(f"| {_label(r)} | - ({m['skipped']}) | - | - | - | - | - |")
            continue
        warn = " (!)" if m.get("lc_warning") else ""
        ch = m["mean_chars"]
        out.append(f"| {_label(r)} | {fmt(m['win_rate'], 3)} | {fmt(m['lc_win_rate'], 3)}{warn} | "
                   f"{m['wins']} / {m['losses']} / {m['ties']} | {m['identical']} | {m['dropped']} | "
                   f"{ch['model']:.0f} / {ch['baseline']:.0f} |")
    if any((_suites(r).get("winrate") or {}).get("lc_warning") for r in rounds):
        out += ["", "(!) the length-controlled rate moved far from the raw one: a sign the GLM did not fit."]
    return "\n".join(out)


def suite_tables(rounds: list[dict], compact: bool = False, head: str = "round") -> str:
    """The suites' tables that have data; `compact`: Video-ChatGPT and the win rate only."""
    makers = (videochatgpt_table, winrate_table) if compact else (
        videochatgpt_table, zeroshot_table, grounded_table, winrate_table)
    return "\n\n".join(t for t in (m(rounds, head) for m in makers) if t)


def round_summary(t: int, metrics: dict) -> str:
    """A few lines for one round (what `vpref demo` prints as it goes)."""
    s = metrics.get("suites") or {}
    lines = []
    if "videochatgpt" in s:
        m = s["videochatgpt"]
        d = m["dimensions"]
        lines.append(f"round {t} Video-ChatGPT (judge {s['judge']['name']}, {m['version']}; 0-5, 95% CI): "
                     + ", ".join(f"{DIM_HEADS[k]} {fmt(d[k])}" for k in VCGPT_DIMENSIONS) + f"; Mean {fmt(m['mean'])}")
    if "winrate" in s:
        m = s["winrate"]
        if m.get("skipped"):
            lines.append(f"round {t} win rate: - ({m['skipped']})")
        else:
            lines.append(f"round {t} win rate vs {m['baseline']}: {fmt(m['win_rate'], 3)}, length-controlled "
                         f"{fmt(m['lc_win_rate'], 3)} (W/L/T {m['wins']}/{m['losses']}/{m['ties']}, "
                         f"{m['identical']} identical, {m['dropped']} dropped)")
    return "\n".join(lines)
