"""Generator backends: what a GeneratorActor hosts.

    generate(requests, sampling, seed) -> list[list[Completion]]
    load_weights(checkpoint_dir)        in place, no new engine
    info() -> dict

`HFBackend` runs transformers `generate` (CPU or GPU); `VLLMBackend` (vpref.actors.vllm_backend,
GPU only) runs a vLLM engine.  The actor only hosts one and does not care which, nor which model
family it serves (`vpref.models.families`: the checkpoint's model_type decides).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vpref.models.generation import Completion


@dataclass
class GenRequest:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    fps: float | None  # sampled frames per second
    question: str


class GeneratorBackend(Protocol):
    def generate(self, requests: list[GenRequest], sampling, seed: int) -> list[list[Completion]]: ...

    def load_weights(self, checkpoint_dir: str) -> dict: ...

    def info(self) -> dict: ...


class HFBackend:
    def __init__(self, path: str, dtype: str = "float32", device: str | None = None):
        import torch

        from vpref.models.video_lm import VideoLM

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vlm = VideoLM.load(path, dtype=dtype, device=device)
        self.path = path

    def generate(self, requests, sampling, seed):
        from vpref.models.generation import generate

        return generate(self.vlm, [r.frames for r in requests], [r.question for r in requests], sampling,
                        fps=[r.fps for r in requests], seed=seed)

    def load_weights(self, checkpoint_dir: str) -> dict:
        from vpref.train.checkpoint import load_weights_into

        t0 = time.perf_counter()
        names = load_weights_into(self.vlm.model, checkpoint_dir)
        self.path = checkpoint_dir
        return {"tensors": len(names), "seconds": time.perf_counter() - t0}

    def info(self) -> dict:
        return {"backend": "hf", "path": self.path, "device": str(self.vlm.device), "family": self.vlm.kind,
                "params": sum(p.numel() for p in self.vlm.model.parameters())}


def check_family(member) -> str:
    """The checkpoint's model family; an error naming both when the member declares another."""
    from vpref.models.families import get_family, model_type

    kind = model_type(member.path)
    get_family(kind, member.path)  # supported at all?
    if member.family and kind != member.family:
        raise ValueError(f"zoo member {member.name!r}: {member.path} is a {kind} checkpoint, the config says family "
                         f"{member.family!r}; fix the path or the family")
    return kind


def make_backend(member) -> GeneratorBackend:
    """The backend a zoo member asks for."""
    if member.backend in ("hf", "vllm"):
        check_family(member)
    if member.backend == "hf":
        return HFBackend(member.path, member.dtype)
    if member.backend == "vllm":
        from vpref.actors.vllm_backend import VLLMBackend

        return VLLMBackend(member.path, member.dtype, member.vllm)
    raise ValueError(f"zoo member {member.name!r}: unknown backend {member.backend!r}; use hf or vllm")
