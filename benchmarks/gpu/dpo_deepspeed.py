"""DPO training throughput (tokens/s) and model FLOPs utilisation with DeepSpeed ZeRO-2/3 on CUDA,
through vpref's own Ray Train job (`vpref.train.dpo.train_dpo`).

Data: a synthetic world (mp4s) in --workdir; pairs are (reference answer, perturbed answer) per
question, with reference log-probs computed once on a GPU by the initial policy (as round 1 of
`vpref run` does), or zeros with --ref zeros (no extra pass for large models).

Measurement: `train_dpo` logs every optimizer step's wall seconds (forward + backward + step
over the micro-batches, without checkpointing).  Steady state = the steps of the last epoch
(the first epoch decodes and caches the videos) or, with one epoch, all steps after
--warmup-steps.  Tokens per step = mean real (unpadded) tokens of a pair (prompt with its
expanded video tokens + answer, chosen and rejected) x batch_size x grad_accum x GPUs.

    tokens/s = tokens per step / mean steady step seconds
    MFU      = 6 * N * tokens/s / (peak_tflops * 1e12 * GPUs)

N = parameters of the checkpoint (all trained; vision patches are counted as their merged
video tokens, so MFU is approximate for the vision tower).  --peak-tflops is the dense BF16
peak per GPU (H100/H200 SXM: 989).

Exact command (GPU machine with DeepSpeed; from the repository root):

    python benchmarks/gpu/dpo_deepspeed.py --size 5m --zero 2 3 --gpus 1 --pairs 1024 --batch-size 16 \
        --epochs 2 --peak-tflops 989 --out benchmarks/results/dpo_deepspeed.json

A real model (8 GPUs, ZeRO-3, recompute activations, reference log-probs skipped):

    python benchmarks/gpu/dpo_deepspeed.py --model /models/Qwen2.5-VL-3B-Instruct --zero 3 --gpus 8 \
        --pairs 512 --batch-size 2 --num-frames 16 --frame-size 448 --gradient-checkpointing --ref zeros \
        --peak-tflops 989 --out benchmarks/results/dpo_deepspeed_qwen3b.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from _common import prepare, require_cuda  # noqa: E402


def require_gpu(gpus: int) -> None:
    require_cuda("deepspeed")
    import torch

    if torch.cuda.device_count() < gpus and not _joining_cluster():
        sys.exit(f"--gpus {gpus} but this machine has {torch.cuda.device_count()} GPUs (pass --ray-address "
                 "to use a cluster)")


def _joining_cluster() -> bool:
    return "--ray-address" in sys.argv


# --------------------------------------------------------------------------- data


def pair_rows(world: Path, n: int) -> list[dict]:
    """(question, reference answer, perturbed answer) pairs over the world's train split, cycled."""
    import numpy as np

    from vpref.data.manifest import load_manifest
    from vpref.data.world import perturb

    samples = load_manifest(world / "train.jsonl").samples
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        s = samples[i % len(samples)]
        rows.append({"pair_id": f"p{i:07d}", "prompt": s.question, "chosen": s.answer,
                     "rejected": perturb(s.answer, rng), "video": s.video})
    return rows


def tokens_per_pair(ckpt: Path, rows: list[dict], data) -> float:
    """Mean real tokens of chosen + rejected sequences, exactly as the trainer builds them."""
    from vpref.data.video import decode_video
    from vpref.models.families import family_of
    from vpref.models.video_lm import VideoLM

    family = family_of(ckpt)
    vlm = VideoLM(None, family.load_processor(ckpt), ckpt, family)
    shapes: dict = {}  # video -> decoded Clip
    total = 0
    for r in rows:
        if r["video"] not in shapes:
            shapes[r["video"]] = decode_video(r["video"], data.num_frames, data.frame_size, timeout_s=None)
        clip = shapes[r["video"]]
        prompt = len(vlm.prompt_ids(r["prompt"], clip.frames, clip.sampled_fps))
        total += 2 * prompt + len(vlm.response_ids(r["chosen"])) + len(vlm.response_ids(r["rejected"]))
    return total / len(rows)


def reference(args, ckpt: Path, rows: list[dict], data) -> list[dict]:
    """Rows + reference log-probs: the initial policy on one GPU (a Ray task), or zeros."""
    if args.ref == "zeros":
        return [{**r, "ref_chosen_logp": 0.0, "ref_rejected_logp": 0.0, "chosen_tokens": 0.0,
                 "rejected_tokens": 0.0} for r in rows]
    import ray

    @ray.remote(num_gpus=1)
    def score(path: str, rows: list[dict], data: dict, batch: int, dtype: str) -> list[tuple]:
        from vpref.config import DataConfig
        from vpref.models.video_lm import VideoLM
        from vpref.train.dpo import score_pairs

        vlm = VideoLM.load(path, dtype=dtype, device="cuda")
        return score_pairs(vlm, rows, DataConfig.model_validate(data), batch)

    got = ray.get(score.remote(str(ckpt), rows, data.model_dump(), args.ref_batch_size,
                               "bfloat16" if args.bf16 else "float32"))
    by_id = {pid: v for pid, *v in got}
    keys = ("ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", "rejected_tokens")
    return [{**r, **dict(zip(keys, by_id[r["pair_id"]]))} for r in rows]


# --------------------------------------------------------------------------- measurement


def steady_steps(metrics: list[dict], epochs: int, warmup: int) -> list[dict]:
    if epochs >= 2:
        last = max(m["epoch"] for m in metrics)
        steady = [m for m in metrics if m["epoch"] == last]
    else:
        steady = metrics[warmup:]
    return steady or metrics[-1:]


def run_stage(args, stage: int, world: Path, ckpt: Path, pairs: Path, tok_per_pair: float, n_params: int) -> dict:
    from vpref.config import DPOConfig
    from vpref.train.dpo import train_dpo

    dpo = DPOConfig(strategy="deepspeed", zero_stage=stage, use_gpu=True, bf16=args.bf16, num_workers=args.gpus,
                    cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size, grad_accum=args.grad_accum,
                    epochs=args.epochs, gradient_checkpointing=args.gradient_checkpointing,
                    offload_optimizer=args.offload_optimizer, freeze_vision=args.freeze_vision,
                    checkpoint_every=0, max_failures=0, lr=args.lr)
    out = Path(args.workdir) / f"dpo-zero{stage}-{int(time.time())}"
    t0 = time.perf_counter()
    res = train_dpo(dpo, data_config(args, world), ckpt, pairs, out, name=f"bench-zero{stage}", seed=0)
    wall = time.perf_counter() - t0
    steady = steady_steps(res.metrics, args.epochs, args.warmup_steps)
    secs = [m["seconds"] for m in steady]
    tokens_per_step = tok_per_pair * args.batch_size * args.grad_accum * args.gpus
    tok_s = tokens_per_step / statistics.mean(secs)
    mfu = 6 * n_params * tok_s / (args.peak_tflops * 1e12 * args.gpus)
    return {"zero_stage": stage, "steps": len(res.metrics), "steady_steps": len(steady),
            "step_seconds_mean": round(statistics.mean(secs), 5), "step_seconds_median": round(statistics.median(secs), 5),
            "tokens_per_step": round(tokens_per_step, 1), "tokens_per_s": round(tok_s, 1),
            "tokens_per_s_per_gpu": round(tok_s / args.gpus, 1), "mfu": round(mfu, 5),
            "final_loss": res.final().get("loss"), "wall_seconds": round(wall, 2), "restarts": res.restarts,
            "checkpoint": res.checkpoint}


def data_config(args, world: Path):
    from vpref.config import DataConfig

    return DataConfig(root=str(world), train=str(world / "train.jsonl"), dev=str(world / "dev.jsonl"),
                      test=str(world / "test.jsonl"), num_frames=args.num_frames, frame_size=args.frame_size)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (default: build a tiny Qwen2.5-VL of --size)")
    p.add_argument("--size", default="5m")
    p.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=[1, 2, 3], help="ZeRO stages to run")
    p.add_argument("--gpus", type=int, default=1, help="Ray Train workers, one GPU each")
    p.add_argument("--cpus-per-worker", type=float, default=4.0)
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--videos", type=int, default=200)
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--frame-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per GPU per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=3, help="steps ignored when --epochs 1")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--ref", choices=["model", "zeros"], default="model", help="reference log-probs")
    p.add_argument("--ref-batch-size", type=int, default=32)
    p.add_argument("--peak-tflops", type=float, required=True,
                   help="dense BF16 peak TFLOP/s of one GPU (H100/H200 SXM: 989; A100: 312)")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: a new local one)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vpref-bench"))
    p.add_argument("--out", default="benchmarks/results/dpo_deepspeed.json")
    args = p.parse_args(argv)
    require_gpu(args.gpus)

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from vpref.actors.vllm_backend import checkpoint_num_params

    world, ckpt = prepare(args)
    data = data_config(args, world)
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:  # a new local cluster (never someone else's by accident), with the dashboard Ray Train reports to
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
    rows = pair_rows(world, args.pairs)
    pairs = Path(args.workdir) / f"pairs-{ckpt.name}-{args.pairs}-{args.ref}-f{args.num_frames}.parquet"
    t0 = time.perf_counter()
    pq.write_table(pa.Table.from_pylist(reference(args, ckpt, rows, data)), pairs)
    ref_seconds = time.perf_counter() - t0
    tok = tokens_per_pair(ckpt, rows, data)
    n_params = checkpoint_num_params(ckpt)
    stages = [run_stage(args, z, world, ckpt, pairs, tok, n_params) for z in args.zero]
    result = {"benchmark": "dpo_deepspeed", "model": str(ckpt), "params": n_params,
              "device": {"gpu": torch.cuda.get_device_name(0), "gpus": args.gpus, "torch": torch.__version__},
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "tokens_per_pair": round(tok, 1), "reference_seconds": round(ref_seconds, 2), "stages": stages}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for s in stages:
        print(f"ZeRO-{s['zero_stage']}: {s['tokens_per_s']:.0f} tokens/s ({s['tokens_per_s_per_gpu']:.0f}/GPU), "
              f"MFU {100 * s['mfu']:.2f}%, step {s['step_seconds_mean'] * 1e3:.1f} ms")
    print(f"wrote {out}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
