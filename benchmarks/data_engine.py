"""Data-engine benchmark (issue 3): streaming efficiency, judge scaling, decodes per video.

    python benchmarks/data_engine.py --out benchmarks/results/data_engine.json

Needs the demo's world and SFT checkpoints (`vpref synth && vpref sft configs/demo.yaml`, or a
`vpref demo` run).  Everything runs on a fresh local Ray cluster; figures are medians of
`--repeats` runs taken in this one process, so the ratios compare like with like.

* streaming: wall time of a whole build (decode -> generate -> queue -> judge -> pairs) against
  the slowest stage run alone on the same work with the same actors; ratio = slowest / build
  (1.0 = the pipeline costs nothing beyond its slowest stage; the goal is >= 0.9).  Also recorded:
  the build against all stages run one after the other (serial_ratio; > 1 means the overlap pays),
  and when the first response and the last judgment land.  On a machine whose few cores every
  stage shares, the writer's, judge's and decoders' CPU time adds to the generators' wall time.
  Two zoos: the demo's three generators, which with everything else share the machine's cores;
  and its policy alone, which holds one core and leaves the rest of the pipeline the other(s) --
  closer to a cluster, where generators, judges and the writer do not share devices.  The build
  also persists every batch before acknowledging it; `persist_s` is that writer work alone.
* judge scaling: a latency-bound judge -- the case of API judges -- is an OpenAI-compatible
  endpoint on loopback that answers each request after `--latency` seconds (its answer is the
  reference judge's scores written in the rubric's format, so parsing and scoring are real); each
  judge actor keeps one request in flight; N judges pull the same responses from the queue.
  Efficiency = throughput(N) / (N * throughput(1)); the goal is >= 0.85.
* decodes per video: builds with zoos of 1, 2 and 3 members must decode each video exactly once.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpref.actors.judge import judge_items, response_item  # noqa: E402
from vpref.actors.pool import JudgePool  # noqa: E402
from vpref.actors.queue import BatchQueue  # noqa: E402
from vpref.actors.writer import PairWriter, write_plan  # noqa: E402
from vpref.build import DataEngine  # noqa: E402
from vpref.config import load_config  # noqa: E402
from vpref.data.manifest import load_manifest  # noqa: E402
from vpref.data.schema import read_records, write_shard  # noqa: E402
from vpref.judges.base import SampleView  # noqa: E402
from vpref.judges.reference import ReferenceJudge  # noqa: E402
from vpref.models.openai_chat import serve_loopback  # noqa: E402
from vpref.utils import quiet_libraries  # noqa: E402


def _item(r, s) -> dict:
    return response_item(r.response_id, r.text, s.id, s.question, s.answer, s.caption, s.family)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------- streaming


def persist_alone(build_dir: Path, out: Path, cfg, members) -> float:
    """The writer's work alone, in this process: the build's responses in its generation batches,
    its judgments in judge batches, one Parquet shard per call, then the compaction."""
    out.mkdir(parents=True)
    write_plan(out, json.loads((build_dir / "plan.json").read_text()))
    responses = read_records(build_dir, "responses")
    judgments = read_records(build_dir, "judgments")
    per_batch = max(m.batch_size * m.sampling.n for m in members)
    bs = cfg.judge.pool.batch_size
    t0 = time.perf_counter()
    w = PairWriter(str(out), cfg.pairs.model_dump())
    for i in range(0, len(responses), per_batch):
        w.add_responses(responses[i:i + per_batch])
    for i in range(0, len(judgments), bs):
        w.add_judgments(judgments[i:i + bs])
    w.finalize()
    return time.perf_counter() - t0


def streaming(engine: DataEngine, cfg, samples, tmp: Path, repeats: int) -> dict:
    members = engine.members
    runs = []
    for k in range(repeats):
        build_dir = tmp / f"build{k}"
        t_build, res = _timed(lambda: engine.build(samples, build_dir, round_=100 + k))
        responses = read_records(build_dir, "responses")
        t_persist = persist_alone(build_dir, tmp / f"persist{k}", cfg, members)
        # Decode alone: every video once, on the same decoder actors.
        videos = sorted({s.video for s in samples})
        t_decode, refs = _timed(lambda: ray.get([engine.decoders.submit(v) for v in videos]) and None)
        clip_refs = {v: engine.decoders.submit(v) for v in videos}
        ray.get(list(clip_refs.values()))
        # Generate alone: the same batches on the same generator actors, frames already decoded.

        def generate_all():
            calls = []
            for m in members:
                actors = engine.generators[m.name]
                for b, i in enumerate(range(0, len(samples), m.batch_size)):
                    chunk = samples[i:i + m.batch_size]
                    calls.append(actors[b % len(actors)].generate.remote(
                        [clip_refs[s.video] for s in chunk], [s.question for s in chunk], None, seed=b))
            return ray.get(calls)

        t_gen, _ = _timed(generate_all)
        # Judge alone: the same responses scored by the same number of judge actors.
        by_id = {s.id: s for s in samples}
        items = [_item(r, by_id[r.sample_id]) for r in responses]
        judges = list(engine.pool.actors.values()) or []
        bs = cfg.judge.pool.batch_size

        def judge_all():
            if not judges:
                return judge_items(ReferenceJudge(), items)
            chunks = [items[i:i + bs] for i in range(0, len(items), bs)]
            return ray.get([judges[c % len(judges)].score_items.remote(chunk) for c, chunk in enumerate(chunks)])

        t_judge, _ = _timed(judge_all)
        slowest = max(("decode", t_decode), ("generate", t_gen), ("judge", t_judge), key=lambda x: x[1])
        # where the build's extra time goes: before its first response, after its last judgment
        first = next((t for t, r, *_ in res.timeline if r > 0), None)
        last = next((t for t, _, j, *_ in res.timeline if j >= res.status["judged"]), None)
        runs.append({"build_s": t_build, "decode_s": t_decode, "generate_s": t_gen, "judge_s": t_judge,
                     "persist_s": t_persist, "slowest_stage": slowest[0], "ratio": slowest[1] / t_build,
                     "serial_ratio": (t_decode + t_gen + t_judge + t_persist) / t_build,
                     "first_response_s": first, "last_judgment_s": last, "responses": len(responses),
                     "decodes": res.decodes})
        print(f"streaming run {k}: build {t_build:.2f}s, decode {t_decode:.2f}s, generate {t_gen:.2f}s, "
              f"judge {t_judge:.2f}s, persist {t_persist:.2f}s -> ratio {slowest[1] / t_build:.3f} (first response at {first}s)", flush=True)
    return {
        "zoo": [f"{m.name} (n={m.sampling.n})" for m in members],
        "questions": len(samples), "responses": runs[0]["responses"], "runs": runs,
        "median_build_s": statistics.median(r["build_s"] for r in runs),
        "median_slowest_stage_s": statistics.median(max(r["decode_s"], r["generate_s"], r["judge_s"]) for r in runs),
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "median_serial_ratio": statistics.median(r["serial_ratio"] for r in runs),
        "goal": ">= 0.9",
    }


# --------------------------------------------------------------------------- judge scaling


_FIELD = re.compile(r"^(Video description|Reference answer|Question|Answer to judge): (.*)$", re.M)


def _api_server(latency: float, families: dict[str, str]):
    """A loopback OpenAI-compatible endpoint with a fixed service latency per request.

    `families` maps question text to question family: the prompt does not carry it, and the
    reference judge scores the asked value by family."""
    ref = ReferenceJudge()

    def reply(body, request):
        fields = dict(_FIELD.findall(body["messages"][0]["content"]))
        question = fields.get("Question", "")
        view = SampleView("s", question, fields.get("Reference answer"), fields.get("Video description"),
                          families.get(question))
        a = ref.aspects(view, fields.get("Answer to judge", ""))
        time.sleep(latency)
        return (f"Relevance: {a['detail']}\nAccuracy: {a['correctness']}\nClarity: {a['concision']}\n"
                "Rationale: checked against the description.")

    return serve_loopback(reply)


def judge_scaling(base_cfg, samples, build_dir: Path, tmp: Path, latency: float, counts, n_items: int) -> dict:
    server, api = _api_server(latency, {s.question: s.family for s in samples})
    by_id = {s.id: s for s in samples}
    responses = read_records(build_dir, "responses")[:n_items]
    plan = json.loads((build_dir / "plan.json").read_text())
    keep = {r.sample_id for r in responses}
    out = {"latency_s": latency, "items": len(responses), "judges": {}}
    for n in counts:
        cfg = load_config(None, [f"judge.kind=llm", f"judge.backend=openai", f"judge.api_base={api}",
                                 "judge.model=api-judge", "judge.api_concurrency=1", "judge.max_parse_retries=0",
                                 f"judge.pool.min={n}", f"judge.pool.max={n}", "judge.pool.batch_size=4",
                                 "judge.pool.resources={num_cpus: 0.1}", "judge.api_cache_dir=null"])
        d = tmp / f"judges{n}"
        d.mkdir(parents=True)
        write_shard(d, "responses", responses)
        write_plan(d, {**plan, "samples": {k: v for k, v in plan["samples"].items() if k in keep},
                       "expected": {k: [r.response_id for r in responses if r.sample_id == k] for k in keep},
                       "judge": "llm:api-judge"})
        pool = JudgePool(cfg.judge, cfg.ray.namespace)
        ray.get([a.ready.remote() for a in pool.actors.values()])
        queue = BatchQueue(actor_options={"num_cpus": 0})
        writer = ray.remote(PairWriter).options(num_cpus=0).remote(str(d), cfg.pairs.model_dump(), None)
        items = [_item(r, by_id[r.sample_id]) for r in responses]
        queue.put_nowait_batch(items)
        t0 = time.perf_counter()
        pool.attach(queue, None, writer)
        while ray.get(writer.status.remote())["judged"] < len(items):
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        st = ray.get(writer.status.remote())
        pool.detach()
        pool.shutdown()
        for a in (writer, queue.actor):
            ray.kill(a)
        out["judges"][n] = {"seconds": elapsed, "items_per_s": len(items) / elapsed, "judge_failures": st["judge_failures"]}
        print(f"judges {n}: {len(items) / elapsed:.1f} items/s ({st['judge_failures']} failures)", flush=True)
    server.shutdown()
    one = out["judges"][counts[0]]["items_per_s"]
    for n, r in out["judges"].items():
        r["speedup"] = r["items_per_s"] / one
        r["efficiency"] = r["speedup"] / n
    out["goal"] = "efficiency >= 0.85"
    return out


# --------------------------------------------------------------------------- decodes per video


def decodes_per_video(base_overrides, samples, tmp: Path) -> dict:
    out = {}
    for size in (1, 2, 3):
        cfg = load_config(None, base_overrides)
        cfg.zoo = cfg.zoo[:size]
        engine = DataEngine(cfg, tmp / f"zoo{size}-state")
        engine.wait_ready()
        res = engine.build(samples, tmp / f"zoo{size}", round_=200 + size)
        engine.shutdown()
        d = res.decodes
        out[size] = {"videos": len({s.video for s in samples}), **d,
                     "decodes_per_video": d["decodes"] / max(1, d["videos"])}
        print(f"zoo of {size}: {d['decodes']} decodes for {d['videos']} videos", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_engine.json"))
    ap.add_argument("--questions", type=int, default=960, help="questions per streaming build")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency", type=float, default=0.05, help="API judge service latency per request (s)")
    ap.add_argument("--judge-items", type=int, default=480)
    ap.add_argument("--judges", default="1,2,4,8")
    args = ap.parse_args()
    quiet_libraries()
    overrides = ["ray.include_dashboard=false", "judge.pool.max=1"]  # stage-alone runs use the same one judge
    cfg = load_config(None, overrides)
    for p in [cfg.data.train] + [m.path for m in cfg.zoo]:
        if not Path(p).exists():
            print(f"missing {p}: run `vpref synth && vpref sft configs/demo.yaml` first", file=sys.stderr)
            return 2
    samples = load_manifest(cfg.data.train, cfg.data.root).samples[: args.questions]
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=False,
             namespace=cfg.ray.namespace)
    tmp = Path(tempfile.mkdtemp(prefix="vpref-bench-"))
    result = {"machine": {"cpus": __import__("os").cpu_count()}, "config": "demo defaults",
              "command": "python benchmarks/data_engine.py " + " ".join(sys.argv[1:])}
    # The demo zoo: three single-threaded generators share the machine's cores with every other
    # stage.  One generator: generation holds one core and the rest of the pipeline has the
    # other(s), as on a cluster where generators, judges and the writer sit on different devices --
    # what remains is the pipeline's own cost.
    for scenario, zoo in (("streaming", cfg.zoo), ("streaming_one_generator", cfg.zoo[:1])):
        scfg = cfg.model_copy(update={"zoo": zoo})
        engine = DataEngine(scfg, tmp / f"state-{scenario}")
        engine.wait_ready()
        engine.build(samples[:64], tmp / f"warmup-{scenario}", round_=99)  # load, compile, warm caches
        result[scenario] = streaming(engine, scfg, samples, tmp / scenario, args.repeats)
        engine.shutdown()
    result["judge_scaling"] = judge_scaling(cfg, samples, tmp / "streaming" / "build0", tmp, args.latency,
                                            [int(x) for x in args.judges.split(",")], args.judge_items)
    result["decodes_per_video"] = decodes_per_video(overrides, samples[:120], tmp)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"streaming_ratio": result["streaming"]["median_ratio"],
                      "streaming_ratio_one_generator": result["streaming_one_generator"]["median_ratio"],
                      "judge_efficiency": {n: round(r["efficiency"], 3) for n, r in result["judge_scaling"]["judges"].items()},
                      "decodes_per_video": {k: v["decodes_per_video"] for k, v in result["decodes_per_video"].items()}},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
