"""What the GPU benchmarks share: the GPU/library check and the cached synthetic inputs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

INSTALL = {"vllm": "pip install 'vpref[gpu]' on the GPU machine",
           "deepspeed": "pip install 'vpref[gpu]' (or 'vpref[deepspeed]')"}


def require_cuda(*libraries: str) -> None:
    """Exit with a clear message unless CUDA is visible and every named library imports."""
    try:
        import torch
    except ImportError:
        sys.exit("this benchmark needs PyTorch with CUDA")
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs CUDA GPUs and none is visible here; run it on a GPU machine "
                 "(see benchmarks/gpu/README.md)")
    for lib in libraries:
        try:
            importlib.import_module(lib)
        except ImportError:
            sys.exit(f"this benchmark needs {lib}: {INSTALL.get(lib, f'pip install {lib}')}")


def prepare(args) -> tuple[Path, Path]:
    """(world folder, checkpoint folder): a synthetic world of `args.videos` clips and, unless
    `args.model` names a checkpoint, a tiny Qwen2.5-VL of `args.size`; both cached in `args.workdir`."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    world = work / f"world-{args.videos}"
    if not (world / "train.jsonl").is_file():
        from vpref.data.synth import SynthSpec, synthesize

        synthesize(world, SynthSpec(n=args.videos, seed=0))
    if args.model:
        return world, Path(args.model)
    ckpt = work / f"tiny-{args.size}"
    if not (ckpt / "config.json").is_file():
        from vpref.models.tiny import build_tiny

        build_tiny(ckpt, args.size, seed=0)
    return world, ckpt
