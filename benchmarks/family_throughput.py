"""Per-family generation throughput on CPU (issue 12): tiny random checkpoints of every
registered video-LLM family, one size, the same clips and questions.

    python benchmarks/family_throughput.py --out benchmarks/results/family_throughput.json

For each family: `VideoLM.generation_batch` (the processor's prompt expansion + the vision
tensors) and `model.generate` of `--new-tokens` tokens for `--batch` questions (sampled,
min_new_tokens = max_new_tokens so every family generates the same number of tokens), one
scoring forward (`sequence_logps`) of the same batch with answers appended, and one SFT step
(forward + backward + AdamW on `--train-batch` answers, what `vpref sft` runs).  Families are
timed round-robin, `--repeats` rounds after a warm-up, so every ratio compares families under
the same machine load; medians, with the min-max range.  Both wall time and this process's CPU
time are recorded: on a shared machine the CPU time is the steadier figure.  Prompt lengths differ by family (the video's
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
    ap.add_argument("--train-batch", type=int, default=16)
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
    phases = ("batch", "generate", "score", "train")
    times = {f: {p: [] for p in phases} for f in families}
    cpu = {f: {p: [] for p in phases} for f in families}
    tclips = (cl * (args.train_batch // len(cl) + 1))[:args.train_batch]
    tframes, tfps = [c.frames for c in tclips], [c.sampled_fps for c in tclips]
    tqs = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.train_batch)]
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

        opts = {f: torch.optim.AdamW(v.model.parameters(), lr=1e-6) for f, v in vlms.items()}

        def once(f: str, record: bool) -> None:
            vlm = vlms[f]
            marks = [(time.perf_counter(), time.process_time())]
            vlm.generation_batch(frames, qs, fps)
            marks.append((time.perf_counter(), time.process_time()))
            with torch.no_grad():
                batch = vlm.generation_batch(frames, qs, fps)
                out = vlm.model.generate(**batch.inputs, max_new_tokens=args.new_tokens,
                                         min_new_tokens=args.new_tokens, do_sample=True, top_p=1.0,
                                         pad_token_id=vlm.pad_id)
            marks.append((time.perf_counter(), time.process_time()))
            assert out.shape[1] - batch.inputs["input_ids"].shape[1] == args.new_tokens
            with torch.no_grad():
                sequence_logps(vlm.model, vlm.scoring_batch(frames, qs, answers, fps))
            marks.append((time.perf_counter(), time.process_time()))
            vlm.model.train()
            loss = -sequence_logps(vlm.model, vlm.scoring_batch(tframes, tqs, answers[:1] * len(tqs), tfps)).mean()
            loss.backward()
            opts[f].step()
            opts[f].zero_grad(set_to_none=True)
            vlm.model.eval()
            marks.append((time.perf_counter(), time.process_time()))
            if record:  # generate includes building its own batch, as generate() does
                for p, (a, b) in zip(phases, zip(marks, marks[1:])):
                    times[f][p].append(b[0] - a[0])
                    cpu[f][p].append(b[1] - a[1])

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
    base = "qwen2_5_vl" if "qwen2_5_vl" in families else families[0]
    med = statistics.median
    for f in families:
        r = dict(info[f])
        for p in phases:
            w, c = times[f][p], cpu[f][p]
            r[f"{p}_s_median"] = round(med(w), 4)
            r[f"{p}_s_range"] = [round(min(w), 4), round(max(w), 4)]
            r[f"{p}_cpu_s_median"] = round(med(c), 4)
            r[f"{p}_cpu_vs_{base}"] = round(med(c) / med(cpu[base][p]), 3)
        r["tokens_per_s_median"] = round(tokens / med(times[f]["generate"]), 1)
        r["tokens_per_cpu_s_median"] = round(tokens / med(cpu[f]["generate"]), 1)
        result["families"][f] = r
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'family':18} {'params':>8} {'prompt':>6} {'tok/s':>7} {'tok/cpu-s':>9} {'gen s (range)':>20} "
          f"{'batch s':>8} {'score s':>8} {'sft step s':>10} {'cpu vs ' + base:>16}")
    for f, r in result["families"].items():
        print(f"{f:18} {r['params']:8d} {r['prompt_tokens']:6d} {r['tokens_per_s_median']:7.1f} "
              f"{r['tokens_per_cpu_s_median']:9.1f} {r['generate_s_median']:7.3f} "
              f"({r['generate_s_range'][0]:.3f}-{r['generate_s_range'][1]:.3f}) {r['batch_s_median']:8.3f} "
              f"{r['score_s_median']:8.3f} {r['train_s_median']:10.3f} "
              f"{r[f'generate_cpu_vs_{base}']:7.2f} / {r[f'train_cpu_vs_{base}']:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
