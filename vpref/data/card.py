"""The dataset card of a build: counts, score and margin histograms, parse-failure rate, win rate
per zoo model and per model family, lengths of chosen vs rejected, and the judge's own figures (failure rate by cause,
score distribution, label mass, endpoint usage and cost, generated captions); README.md +
card.json + a PNG in the folder."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from vpref.data.schema import read_table, schema_doc


def _hist(values, edges) -> list[tuple[str, int]]:
    counts, _ = np.histogram(values, bins=edges)
    return [(f"{a:.1f}-{b:.1f}", int(c)) for a, b, c in zip(edges[:-1], edges[1:], counts)]


def _bars(rows: list[tuple[str, int]]) -> str:
    top = max((c for _, c in rows), default=0) or 1
    return "\n".join(f"    {label:>9} | {'#' * round(30 * c / top):30s} {c}" for label, c in rows)


def model_families(resp) -> dict[str, str]:
    """Zoo model name -> the model family (model_type) of the checkpoint it answered with."""
    from vpref.models.families import model_type

    out = {}
    for model, path in resp.groupby("model").model_path.first().items() if len(resp) else []:
        try:
            out[model] = model_type(path)
        except (OSError, ValueError):  # the checkpoint moved or is gone: the card still gets written
            out[model] = "?"
    return out


def family_win_rates(win: dict, families: dict[str, str], resp, ok) -> dict:
    """The per-model win table summed per model family; the mean judge score over the family's
    judged responses."""
    out: dict[str, dict] = {}
    for model, w in win.items():
        f = out.setdefault(families.get(model, "?"), {"models": [], "chosen": 0, "rejected": 0, "responses": 0})
        f["models"].append(model)
        for k in ("chosen", "rejected", "responses"):
            f[k] += w[k]
    for f in out.values():
        scores = ok.merge(resp[resp.model.isin(f["models"])][["response_id"]], on="response_id").overall \
            if len(ok) else []
        f["win_rate"] = round(f["chosen"] / (f["chosen"] + f["rejected"]), 3) if f["chosen"] + f["rejected"] else None
        f["mean_score"] = round(float(np.mean(scores)), 3) if len(scores) else None
    return dict(sorted(out.items()))
def _q(values, q) -> float | None:
    return round(float(np.quantile(values, q)), 4) if len(values) else None


def judge_stats(judg, verd, out_dir: str | Path | None = None) -> dict:
    """The judge's figures, from the judgments and verdicts tables alone (columns a table written
    before they existed reads as null)."""
    n = len(judg)
    ok = judg[judg.ok] if n else judg
    total = lambda df, c: float(df[c].fillna(0).astype(float).sum()) if len(df) else 0.0  # noqa: E731
    aspects: dict[str, list[float]] = {}
    masses: list[float] = []
    for scores, mass in zip(ok.scores, ok.label_mass) if n else ():
        for e in scores if scores is not None else []:
            aspects.setdefault(e["key"], []).append(e["value"])
        if mass is not None and len(mass):
            masses.append(min(e["value"] for e in mass))
    usage = {"requests": int(total(judg, "requests") + total(verd, "requests")),
             "input_tokens": int(total(judg, "input_tokens") + total(verd, "input_tokens")),
             "output_tokens": int(total(judg, "output_tokens") + total(verd, "output_tokens")),
             "cost_usd": round(total(judg, "cost_usd") + total(verd, "cost_usd"), 6),
             "cache_hits": int(total(judg, "cache_hit"))}
    stats = {
        "judges": sorted(set(judg.judge)) if n else [],
        "judgments": n,
        "failure_rate": round(float((~judg.ok).mean()), 4) if n else 0.0,
        "failures_by_cause": dict(Counter(f or "other" for f in judg.failure[~judg.ok])) if n else {},
        "paths": dict(Counter(p or "?" for p in judg.path)) if n else {},
        "overall": {"mean": round(float(ok.overall.mean()), 4) if len(ok) else None,
                    "p10": _q(ok.overall, 0.1), "median": _q(ok.overall, 0.5), "p90": _q(ok.overall, 0.9)},
        "aspect_means": {a: round(float(np.mean(v)), 4) for a, v in aspects.items()},
        "label_mass": {"min": _q(masses, 0.0), "p10": _q(masses, 0.1), "median": _q(masses, 0.5)} if masses else None,
        "usage": usage,
    }
    if out_dir is not None:
        from vpref.judges.captions import caption_stats

        stats["generated_captions"] = caption_stats(out_dir)
    return stats


def _judge_markdown(j: dict) -> str:
    causes = ", ".join(f"{k} {v}" for k, v in j["failures_by_cause"].items()) or "none"
    mass = j["label_mass"]
    mass_line = (f"Label mass (least over a judgment's aspects): min {mass['min']}, 10th percentile {mass['p10']}, "
                 f"median {mass['median']}.\n" if mass else "")
    u = j["usage"]
    caps = j.get("generated_captions") or {}
    cap_line = (f"Generated captions: {caps['questions']} questions ({caps['videos']} videos) read a caption written by "
                f"{', '.join(caps['models'])} from {caps['clips']} clips (`captions.jsonl`).\n"
                if caps.get("videos") else "")
    usage_line = (f"Endpoint usage: {u['requests']} requests, {u['cache_hits']} judgments from the cache, "
                  f"{u['input_tokens']} input and\n{u['output_tokens']} output tokens, cost ${u['cost_usd']:.4f}.\n"
                  if u["requests"] or u["cache_hits"] else "")  # a local judge sends none: no line of zeros
    o = j["overall"]
    return f"""## Judge

Judge {', '.join(f'`{x}`' for x in j['judges']) or '-'}: {j['judgments']} judgments, failure rate
{j['failure_rate']:.1%} (by cause: {causes}); produced by {', '.join(f'{k} {v}' for k, v in j['paths'].items()) or '-'}.
Overall score of the successful judgments: mean {o['mean']}, 10th percentile {o['p10']}, median {o['median']},
90th percentile {o['p90']}; per aspect {j['aspect_means']}.
{mass_line}{usage_line}{cap_line}"""


def card_stats(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    resp = read_table(out, "responses").to_pandas()
    judg = read_table(out, "judgments").to_pandas()
    pairs = read_table(out, "pairs").to_pandas()
    verd = read_table(out, "verdicts").to_pandas()
    ok = judg[judg.ok] if len(judg) else judg
    n_judg = len(judg)
    win = {}
    for model in sorted(set(resp.model)) if len(resp) else []:
        c = int((pairs.chosen_model == model).sum()) if len(pairs) else 0
        r = int((pairs.rejected_model == model).sum()) if len(pairs) else 0
        scores = ok.merge(resp[resp.model == model][["response_id"]], on="response_id").overall if len(ok) else []
        win[model] = {"chosen": c, "rejected": r, "win_rate": round(c / (c + r), 3) if c + r else None,
                      "mean_score": round(float(np.mean(scores)), 3) if len(scores) else None,
                      "responses": int((resp.model == model).sum())}
    families = model_families(resp)
    score_edges = np.arange(1.0, 5.01, 0.5)
    margin_edges = np.arange(0.0, 4.01, 0.5)
    return {
        "questions": int(resp.sample_id.nunique()) if len(resp) else 0,
        "responses": len(resp),
        "generation_errors": int(resp.error.notna().sum()) if len(resp) else 0,
        "judgments": n_judg,
        "judge_failures": int((~judg.ok).sum()) if n_judg else 0,
        "parse_failure_rate": round(float((~judg.ok).mean()), 4) if n_judg else 0.0,
        "verdicts": len(verd),
        "verdicts_inconsistent": int((verd.ok & ~verd.consistent).sum()) if len(verd) else 0,
        "pairs": len(pairs),
        "pairs_by_family": dict(Counter(pairs.family)) if len(pairs) else {},
        "chosen_beats_rejected": round(float((pairs.chosen_score > pairs.rejected_score).mean()), 4) if len(pairs) else None,
        "score_histogram": _hist(ok.overall, score_edges) if len(ok) else [],
        "margin_histogram": _hist(pairs.margin, margin_edges) if len(pairs) else [],
        "win_rate": win,
        "model_families": families,
        "win_rate_by_family": family_win_rates(win, families, resp, ok),
        "mean_tokens": {"chosen": round(float(pairs.chosen_num_tokens.mean()), 2) if len(pairs) else None,
                        "rejected": round(float(pairs.rejected_num_tokens.mean()), 2) if len(pairs) else None},
        "failure_examples": judg[~judg.ok][["response_id", "error"]].head(5).to_dict("records") if n_judg else [],
        "judge": judge_stats(judg, verd, out),
    }


def write_card(out_dir: str | Path, extra: dict | None = None) -> dict:
    out = Path(out_dir)
    stats = card_stats(out)
    if extra:
        stats["build"] = extra
    (out / "card.json").write_text(json.dumps(stats, indent=2, default=str))
    _plot(out, stats)
    build = json.loads((out / "build.json").read_text()) if (out / "build.json").is_file() else {}
    win_rows = "\n".join(
        f"| {m} | {stats['model_families'].get(m, '?')} | {w['responses']} | {w['mean_score']} | {w['chosen']} "
        f"| {w['rejected']} | {w['win_rate']} |" for m, w in stats["win_rate"].items())
    family_rows = "\n".join(
        f"| {f} | {', '.join(w['models'])} | {w['responses']} | {w['mean_score']} | {w['chosen']} | {w['rejected']} "
        f"| {w['win_rate']} |" for f, w in stats["win_rate_by_family"].items())
    text = f"""# Preference data (vpref build)

Round {build.get('round', '?')}, policy version {build.get('policy_version', '?')}; judge `{build.get('judge', '?')}`,
rubric `{build.get('rubric', '?')}`; pair strategy `{build.get('pairs', {}).get('strategy', '?')}`
(min margin {build.get('pairs', {}).get('min_margin', '?')}).

## Counts

| questions | responses | generation errors | judgments | judge failures (parse-failure rate) | pairs |
|---|---|---|---|---|---|
| {stats['questions']} | {stats['responses']} | {stats['generation_errors']} | {stats['judgments']} | {stats['judge_failures']} ({stats['parse_failure_rate']:.1%}) | {stats['pairs']} |

Pairwise verdicts: {stats['verdicts']} ({stats['verdicts_inconsistent']} inconsistent across the two orders, dropped).
Chosen scored above rejected in {stats['chosen_beats_rejected']} of the pairs. Pairs by question family: {stats['pairs_by_family']}.

{_judge_markdown(stats['judge'])}
## Zoo models

| model | family | responses | mean judge score | chosen | rejected | win rate |
|---|---|---|---|---|---|---|
{win_rows}

## Model families

| family | models | responses | mean judge score | chosen | rejected | win rate |
|---|---|---|---|---|---|---|
{family_rows}

Mean length in tokens: chosen {stats['mean_tokens']['chosen']}, rejected {stats['mean_tokens']['rejected']}.

## Judge scores (overall, successful judgments)

{_bars(stats['score_histogram'])}

## Margins (chosen - rejected)

{_bars(stats['margin_histogram'])}

![histograms](card.png)

## Files

{schema_doc()}

Read a table with `pyarrow.parquet.read_table("<folder>/pairs")` (or `vpref.data.schema.read_table`).
"""
    (out / "README.md").write_text(text)
    return stats


def _plot(out: Path, stats: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, key, title in ((axes[0], "score_histogram", "judge overall score"), (axes[1], "margin_histogram", "pair margin")):
        rows = stats[key]
        ax.bar(range(len(rows)), [c for _, c in rows])
        ax.set_xticks(range(len(rows)), [lbl for lbl, _ in rows], rotation=45, fontsize=7)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "card.png", dpi=80)
    plt.close(fig)
