"""In-place weight reload time of the vLLM backend vs model size (and vs starting a new engine).

For every tiny size (two checkpoints of the same architecture, seeds 0 and 1, built in
--workdir) and every --model folder, one fresh process builds a `VLLMBackend` and times:

* `load_weights(other, skip_vision=False)`: the whole checkpoint, alternating the two folders;
* `load_weights(other, skip_vision=True)`: language model only (a frozen vision tower);
* `load_weights(other)` with the automatic decision (includes comparing the vision towers);
* the engine start (`VLLMBackend.startup_seconds`), which a reload replaces.

A --model folder is reloaded from itself (pass --model-b for a second folder of the same
architecture, e.g. the next round's checkpoint).

Exact command (GPU machine, vLLM installed; from the repository root):

    python benchmarks/gpu/reload_time.py --sizes 3m 5m --repeats 5 \
        --out benchmarks/results/reload_time.json

    python benchmarks/gpu/reload_time.py --sizes 3m --model /models/Qwen2.5-VL-7B-Instruct \
        --model-b /ckpt/round_01/policy --out benchmarks/results/reload_time_qwen7b.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from _common import require_cuda  # noqa: E402


def tiny_pair(workdir: Path, size: str) -> tuple[Path, Path]:
    from vpref.models.tiny import build_tiny, rubric_corpus, train_tokenizer, world_corpus

    a, b = workdir / f"tiny-{size}-s0", workdir / f"tiny-{size}-s1"
    if not ((a / "config.json").is_file() and (b / "config.json").is_file()):
        tok = train_tokenizer(world_corpus() + rubric_corpus(), 1024)
        build_tiny(a, size, seed=0, tokenizer=tok)
        build_tiny(b, size, seed=1, tokenizer=tok)
    return a, b


def measure(args, a: Path, b: Path) -> dict:
    """Runs in its own process: one engine, reloads timed."""
    from vpref.actors.vllm_backend import VLLMBackend, checkpoint_num_params, vision_tensor_names
    from vpref.config import VLLMConfig

    backend = VLLMBackend(str(a), args.dtype, VLLMConfig(
        tensor_parallel_size=args.tp, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, enforce_eager=True))
    runs: dict[str, list[dict]] = {"full": [], "skip_vision": [], "auto": []}
    backend.load_weights(str(b), skip_vision=False)  # warm-up: the first reload allocates loader buffers
    loads = 0
    for _ in range(args.repeats):
        for kind, skip in (("full", False), ("skip_vision", True), ("auto", None)):
            target = a if loads % 2 == 0 else b  # always the other folder (timing only: with two tiny
            loads += 1                           # seeds a kept tower is not the folder's own)
            runs[kind].append(backend.load_weights(str(target), skip_vision=skip))
    row = {"checkpoint": str(a), "other": str(b), "params": checkpoint_num_params(a),
           "vision_tensors": len(vision_tensor_names(a)), "startup_s": round(backend.startup_seconds, 3),
           "vllm_version": backend.info()["vllm_version"]}
    for kind, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        row[kind] = {"median_s": round(statistics.median(secs), 4), "min_s": round(min(secs), 4),
                     "worker_median_s": round(statistics.median(r["worker_seconds"] for r in rs), 4),
                     "decide_median_s": round(statistics.median(r["decide_seconds"] for r in rs), 4),
                     "tensors": rs[-1]["tensors"], "bytes": rs[-1]["bytes"],
                     "GB_per_s": round(rs[-1]["bytes"] / statistics.median(secs) / 1e9, 3),
                     "skip_vision": [r["skip_vision"] for r in rs]}
    row["reload_vs_startup"] = round(row["full"]["median_s"] / backend.startup_seconds, 4)
    return row


def child(args, label: str, a: Path, b: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        tmp = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(a), str(b), "--out", str(tmp),
           "--repeats", str(args.repeats), "--dtype", args.dtype, "--tp", str(args.tp),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--max-model-len", str(args.max_model_len)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT)
    if proc.returncode != 0:
        return {"label": label, "checkpoint": str(a), "error": f"exit code {proc.returncode}"}
    row = json.loads(tmp.read_text())
    tmp.unlink()
    return {"label": label, **row}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="*", default=["3m", "5m"],
                   help="tiny sizes to build and time (0.2m/1m have head_dim 32, which some vLLM attention "
                        "backends refuse)")
    p.add_argument("--model", action="append", default=[], help="a real checkpoint folder (repeatable)")
    p.add_argument("--model-b", action="append", default=[],
                   help="second folder of the same architecture for the matching --model (default: itself)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vpref-bench"))
    p.add_argument("--one", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)  # internal: one process, one model
    p.add_argument("--out", default="benchmarks/results/reload_time.json")
    args = p.parse_args(argv)
    require_cuda("vllm")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.one:
        out.write_text(json.dumps(measure(args, Path(args.one[0]), Path(args.one[1])), indent=2))
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        a, b = tiny_pair(work, size)
        rows.append(child(args, f"tiny-{size}", a, b))
    for i, m in enumerate(args.model):
        other = args.model_b[i] if i < len(args.model_b) else m
        rows.append(child(args, Path(m).name, Path(m), Path(other)))
    import torch
    import vllm

    result = {"benchmark": "reload_time", "device": {"gpu": torch.cuda.get_device_name(0), "vllm": vllm.__version__},
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "one")}, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    for r in rows:
        if "error" in r:
            print(f"{r['label']:>24}: {r['error']}")
        else:
            print(f"{r['label']:>24}: {r['params'] / 1e6:9.2f}M params  full {r['full']['median_s']:.3f}s  "
                  f"skip-vision {r['skip_vision']['median_s']:.3f}s  auto {r['auto']['median_s']:.3f}s  "
                  f"start {r['startup_s']:.1f}s")
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
