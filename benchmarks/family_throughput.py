"""Per-family generation throughput on CPU (issue 12): tiny random checkpoints of every
registered video-LLM family, one size, the same clips and questions.

    python benchmarks/family_throughput.py --out benchmarks/results/family_throughput.json

For each family: `VideoLM.generation_batch` (the processor's prompt expansion + the vision
tensors) and `model.generate` of `--new-tokens` tokens for `--batch` questions (sampled,
min_new_tokens = max_new_tokens so every family generates the same number of tokens), plus one
scoring forward (`sequence_logps`) of the same batch with answers appended.  Families are timed
round-robin, `--repeats` rounds after a warm-up, so every ratio compares families under the same
machine load; medians, with the min-max range.  Prompt lengths differ by family (the video's
token count is the family's: 16 for Qwen2.5-VL at 56x56, 33 for LLaVA-OneVision at 64x64 with
16-px patches, ...), and are recorded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpref.models.families import SUPPORTED  # noqa: E402
from vpref.utils import quiet_libraries  # noqa: E402

QUESTIONS = ["What colour is the circle?", "How many shapes are in the video?", "Describe the video in detail.",
             "Which way does the square move?"]


def clips(n: int, frames: int, size: int) -> list[np.ndarray]:
    """Real synthetic-world clips: rendered, written as mp4, decoded back."""
    from vpref.data.synth import SynthSpec, render, sample_scene
    from vpref.data.video import decode_video, write_video

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            path = Path(tmp) / f"v{i}.mp4"
            write_video(path, render(sample_scene(np.random.default_rng([3, i]), SynthSpec(size=size))), fps=8)
            out.append(decode_video(path, frames, timeout_s=None))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "family_throughput.json"))
    ap.add_argument("--families", default=",".join(sorted(SUPPORTED)))
    ap.add_argument("--size", default="1m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)

    from vpref.config import SamplingConfig
    from vpref.models.generation import generate
    from vpref.models.tiny import build_tiny, rubric_corpus, train_tokenizer, world_corpus
    from vpref.models.video_lm import VideoLM, sequence_logps

    families = args.families.split(",")
    cl = clips(args.batch, 8, 64)
    frames, fps = [c.frames for c in cl], [c.sampled_fps for c in cl]
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.batch)]
    answers = ["The circle is red."] * args.batch
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, n=1)
    times: dict[str, dict[str, list[float]]] = {f: {"batch": [], "generate": [], "score": []} for f in families}
    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(world_corpus(120) + rubric_corpus(), 1024)
        vlms = {}
        for f in families:
            path = build_tiny(Path(tmp) / f, args.size, seed=0, tokenizer=tok, family=f)
            vlms[f] = VideoLM.load(path)
            b = vlms[f].generation_batch(frames, qs, fps)
            info[f] = {"params": sum(p.numel() for p in vlms[f].model.parameters()),
                       "prompt_tokens": int(b.inputs["attention_mask"].sum(1).float().mean()),
                       "processor": type(vlms[f].processor).__name__,
                       "video_processor": type(vlms[f].processor.video_processor).__name__}

        def once(f: str, record: bool) -> None:
            vlm = vlms[f]
            t0 = time.perf_counter()
            vlm.generation_batch(frames, qs, fps)
            t1 = time.perf_counter()
            with torch.no_grad():
                batch = vlm.generation_batch(frames, qs, fps)
                out = vlm.model.generate(**batch.inputs, max_new_tokens=args.new_tokens,
                                         min_new_tokens=args.new_tokens, do_sample=True, top_p=1.0,
                                         pad_token_id=vlm.pad_id)
            t2 = time.perf_counter()
            assert out.shape[1] - batch.inputs["input_ids"].shape[1] == args.new_tokens
            with torch.no_grad():
                sequence_logps(vlm.model, vlm.scoring_batch(frames, qs, answers, fps))
            t3 = time.perf_counter()
            if record:
                times[f]["batch"].append(t1 - t0)
                times[f]["generate"].append(t2 - t1)  # includes building its own batch (as generate() does)
                times[f]["score"].append(t3 - t2)

        for f in families:  # warm-up (and a check that the public generate() path runs)
            generate(vlms[f], frames[:2], qs[:2], sampling)
            once(f, record=False)
        for _ in range(args.repeats):
            for f in families:
                once(f, record=True)

    tokens = args.batch * args.new_tokens
    result = {"families": {}, "settings": {**vars(args), "frames": 8, "frame_size": 64,
                                           "torch_threads": torch.get_num_threads(),
                                           "machine": platform.platform(), "cpus": __import__("os").cpu_count()}}
    ref = statistics.median(times.get("qwen2_5_vl", times[families[0]])["generate"])
    for f in families:
        g = times[f]["generate"]
        result["families"][f] = {
            **info[f],
            "generate_s_median": round(statistics.median(g), 4), "generate_s_range": [round(min(g), 4), round(max(g), 4)],
            "tokens_per_s_median": round(tokens / statistics.median(g), 1),
            "batch_build_s_median": round(statistics.median(times[f]["batch"]), 4),
            "score_forward_s_median": round(statistics.median(times[f]["score"]), 4),
            "generate_time_vs_qwen2_5_vl": round(statistics.median(g) / ref, 3),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'family':18} {'params':>8} {'prompt':>6} {'tok/s':>7} {'gen s (range)':>20} {'batch s':>8} {'score s':>8}")
    for f, r in result["families"].items():
        print(f"{f:18} {r['params']:8d} {r['prompt_tokens']:6d} {r['tokens_per_s_median']:7.1f} "
              f"{r['generate_s_median']:7.3f} ({r['generate_s_range'][0]:.3f}-{r['generate_s_range'][1]:.3f}) "
              f"{r['batch_build_s_median']:8.3f} {r['score_forward_s_median']:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
