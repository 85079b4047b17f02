"""Judge benchmark (issue 9): how good each judge is, and what distributional scoring costs.

    python benchmarks/judges.py --out benchmarks/results/judges.json

1. `vpref judge-eval` on a synthetic world (written to --work when it is not there) with the five
   judges the issue names: the reference judge, SmolLM2-135M-Instruct as a distributional rubric
   judge, SmolLM2 as a grounding (PMI) judge, the random tiny Qwen2.5-VL as a distributional
   rubric judge (the floor), and SmolLM2 behind the loopback OpenAI-compatible server (real HTTP
   on 127.0.0.1, log-probs, prefill by continue_final_message).  Its judge_eval.json / .md / .png
   go next to the JSON.
2. Cost on the same judge model (SmolLM2, rubric mmaipv, one judgment per call): distributional
   scoring on the KV-cached chain, the same without the cache (every aspect a full forward,
   batched over answers), and free-text generation of the whole reply (one greedy attempt, then
   strict parsing).  Forward passes and tokens run through the model per judgment come from the
   engine's counters; judgments/s are medians over --repeats, ratios within this one run.

Torch runs one thread (`--threads`): on a machine shared with other jobs, two threads that
contend for two cores were 7x slower than one in a forward of SmolLM2.
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

from vpref.utils import quiet_libraries  # noqa: E402


def world(work: Path) -> Path:
    from vpref.data.synth import SynthSpec, synthesize

    w = work / "world"
    if not (w / "dev.jsonl").is_file():
        synthesize(w, SynthSpec(n=240, seed=11))
    return w


def tiny(work: Path) -> Path:
    from vpref.models.tiny import build_tiny

    p = work / "tiny-random-1m"
    if not (p / "config.json").is_file():
        build_tiny(p, "1m", seed=0)
    return p


def judge_eval(w: Path, tiny_path: Path, out: Path, questions: int, bootstrap: int) -> dict:
    from vpref.config import load_config
    from vpref.judges.judge_eval import run_judge_eval

    judges = ("[{kind: reference}, "
              "{kind: llm, model: smollm2, name: 'SmolLM2-135M distributional (mmaipv)'}, "
              "{kind: grounding, model: smollm2, name: 'SmolLM2-135M grounding (PMI)'}, "
              f"{{kind: llm, model: '{tiny_path}', name: 'tiny random 1M distributional (floor)'}}, "
              "{kind: llm, model: smollm2, loopback: true, name: 'SmolLM2-135M via loopback HTTP (logprobs)'}]")
    cfg = load_config(None, [f"data.root={w}", f"data.dev={w}/dev.jsonl", f"judge_eval.out={out}",
                             f"judge_eval.max_questions={questions}", f"judge_eval.bootstrap={bootstrap}",
                             f"judge_eval.judges={judges}"])
    return run_judge_eval(cfg)


def cost(w: Path, n: int, repeats: int) -> dict:
    """Distributional (cached chain / plain) vs free text, SmolLM2, one judgment per call."""
    from vpref.data.manifest import load_manifest
    from vpref.judges.base import ResponseView
    from vpref.judges.engines.hf import ChatLM
    from vpref.judges.judge_eval import world_items
    from vpref.judges.llm import LLMJudge
    from vpref.models.smollm2 import smollm2_checkpoint

    lm = ChatLM.load(smollm2_checkpoint())
    items = world_items(load_manifest(w / "dev.jsonl").samples, n)
    jobs = [(it.sample, ResponseView(a.response_id, a.text)) for it in items for a in it.answers[:2]][:n]

    class Uncached:  # the same engine without its chain method: every aspect a full forward
        def __init__(self, engine):
            self.engine, self.path = engine, engine.path

        def label_logprobs(self, queries):
            return self.engine.label_logprobs(queries)

    variants = {
        "distribution_kv_cached": LLMJudge(lm, "mmaipv"),
        "distribution_no_cache": LLMJudge(Uncached(lm), "mmaipv"),
        "free_text_greedy": LLMJudge(lm, "mmaipv", mode="text", max_parse_retries=0, max_new_tokens=48),
    }
    out = {"judge_model": "SmolLM2-135M-Instruct", "rubric": "mmaipv", "judgments": len(jobs), "variants": {}}
    prompt_tokens = statistics.mean(len(lm.encode(lm.render(LLMJudge(lm, "mmaipv").spec.render(
        question=s.question, response=r.text, context=s.caption, reference=s.answer)))) for s, r in jobs)
    for name, judge in variants.items():
        times, stats, ok = [], None, 0
        for rep in range(repeats):
            lm.stats.clear()
            t0 = time.perf_counter()
            results = [judge.score(s, [r])[0] for s, r in jobs]
            times.append(time.perf_counter() - t0)
            stats, ok = dict(lm.stats), sum(j.ok for j in results)
        per = len(jobs)
        # one forward per generated token (the first one runs the prompt), one per scoring call
        forwards = stats.get("forward_calls", 0) + stats.get("decode_steps", 0)
        out["variants"][name] = {
            "judgments_per_s": round(per / statistics.median(times), 4), "seconds": [round(t, 2) for t in times],
            "forward_passes_per_judgment": round(forwards / per, 2),
            "tokens_through_model_per_judgment": round(
                (stats.get("tokens", 0) + stats.get("generate_calls", 0) * (prompt_tokens - 1)
                 + stats.get("decode_steps", 0)) / per, 1),
            "ok": ok, "engine_stats": stats}
    v = out["variants"]
    out["mean_prompt_tokens"] = round(prompt_tokens, 1)
    out["speedup_vs_free_text"] = round(v["distribution_kv_cached"]["judgments_per_s"]
                                        / v["free_text_greedy"]["judgments_per_s"], 2)
    out["kv_cache_speedup"] = round(v["distribution_kv_cached"]["judgments_per_s"]
                                    / v["distribution_no_cache"]["judgments_per_s"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/judges.json"))
    ap.add_argument("--work", default=str(ROOT / "runs/bench-judges"))
    ap.add_argument("--questions", type=int, default=30, help="judge-eval questions (4 answers each)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--cost-judgments", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-eval", action="store_true", help="only the cost comparison")
    args = ap.parse_args()
    import torch

    quiet_libraries()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = world(work)
    result = {"torch_threads": args.threads, "world": str(w)}
    t0 = time.perf_counter()
    if not args.skip_eval:
        result["judge_eval"] = judge_eval(w, tiny(work), out_path.parent / "judge_eval", args.questions, args.bootstrap)
        print((out_path.parent / "judge_eval" / "judge_eval.md").read_text())
        out_path.write_text(json.dumps(result, indent=2))  # each phase is kept as soon as it ends
    result["cost"] = cost(w, args.cost_judgments, args.repeats)
    print(json.dumps(result["cost"], indent=2))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
