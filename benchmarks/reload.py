"""Reload benchmark (issue 4): loading a new policy into K generator replicas, in place, against
loading it once.

    python benchmarks/reload.py --out benchmarks/results/reload.json

For each model size and K in {1, 2, 4}: K GeneratorActors host the policy; `DataEngine.reload_policy`
loads a new checkpoint into all of them in parallel (same processes, version bumped).  The
baseline is one in-place load in this process (`load_weights_into`, the same code).  Also
recorded: a cold start (a new actor loading the model from scratch), which is what a reload by
actor restart would cost.  Medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpref.build import DataEngine, RemoteGenerator  # noqa: E402
from vpref.config import load_config  # noqa: E402
from vpref.train.checkpoint import load_weights_into  # noqa: E402
from vpref.utils import quiet_libraries  # noqa: E402


def checkpoints(policy: Path, tmp: Path, size: str) -> tuple[Path, Path]:
    """Two checkpoints of one architecture (the second is the first, perturbed)."""
    import torch
    from transformers import AutoTokenizer

    from vpref.models.tiny import build_tiny
    from vpref.train.checkpoint import load_state_dict, save_state_dict

    a = policy if size == "1m" else build_tiny(tmp / f"{size}-a", size, tokenizer=AutoTokenizer.from_pretrained(policy))
    sd = load_state_dict(a)
    torch.manual_seed(0)
    b = save_state_dict({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}, a,
                        tmp / f"{size}-b")
    return Path(a), b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reload.json"))
    ap.add_argument("--sizes", default="1m,5m")
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    quiet_libraries()
    base = load_config(None, ["ray.include_dashboard=false"])
    policy = Path(base.policy_member.path)
    if not (policy / "model.safetensors").is_file():
        print(f"missing {policy}: run `vpref synth && vpref sft configs/demo.yaml` first", file=sys.stderr)
        return 2
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="vpref-bench")
    tmp = Path(tempfile.mkdtemp(prefix="vpref-reload-"))
    result = {"sizes": {}}
    for size in args.sizes.split(","):
        a, b = checkpoints(policy, tmp, size)
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(a)
        once = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            load_weights_into(model, b if i % 2 == 0 else a)
            once.append(time.perf_counter() - t0)
        row = {"params": sum(p.numel() for p in model.parameters()), "load_once_s": statistics.median(once), "replicas": {}}
        for k in (int(x) for x in args.replicas.split(",")):
            cfg = load_config(None, ["ray.include_dashboard=false", f"zoo=[{{name: policy, path: '{a}', policy: true, "
                                     f"replicas: {k}, resources: {{num_cpus: 0.5}}}}]", "judge.pool.min=0"])
            engine = DataEngine(cfg, tmp / f"state-{size}-{k}")
            engine.wait_ready()
            pids = {r["pid"] for r in ray.get([x.info.remote() for x in engine.policy_replicas()])}
            times = []
            for i in range(args.repeats):
                t0 = time.perf_counter()
                engine.reload_policy(b if i % 2 == 0 else a, version=i + 1)
                times.append(time.perf_counter() - t0)
            after = {r["pid"] for r in ray.get([x.info.remote() for x in engine.policy_replicas()])}
            assert after == pids, "a reload must not restart the actors"
            engine.shutdown()
            row["replicas"][k] = {"reload_s": statistics.median(times),
                                  "ratio_to_once": statistics.median(times) / row["load_once_s"]}
            print(f"{size} x{k}: reload {statistics.median(times) * 1000:.1f} ms "
                  f"({row['replicas'][k]['ratio_to_once']:.2f}x one in-process load)", flush=True)
        cold = []
        member = load_config(None, [f"zoo=[{{name: policy, path: '{a}', policy: true}}]"]).zoo[0]
        for i in range(3):
            t0 = time.perf_counter()
            actor = RemoteGenerator.options(num_cpus=0.5).remote(member.model_dump(), f"cold-{i}", None)
            ray.get(actor.info.remote())
            cold.append(time.perf_counter() - t0)
            ray.kill(actor)
        row["cold_actor_start_s"] = statistics.median(cold)
        result["sizes"][size] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
