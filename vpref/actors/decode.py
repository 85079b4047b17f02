"""Decode once: one Ray task per video per build, its frames shared through the object store
with every generator (and judge) that needs them."""

from __future__ import annotations

import ray

from vpref.data.video import Clip, decode_video


@ray.remote
class DecodeCounter:
    """Counts decodes where they happen (a retried task counts again), for the build summary."""

    def __init__(self):
        self.n = 0
        self.by_video: dict[str, int] = {}

    def add(self, path: str) -> None:
        self.n += 1
        self.by_video[path] = self.by_video.get(path, 0) + 1

    def get(self) -> dict:
        return {"decodes": self.n, "videos": len(self.by_video), "max_per_video": max(self.by_video.values(), default=0)}


@ray.remote(num_cpus=0.25)
def decode_clip(path: str, num_frames: int, size, timeout_s: float, counter=None) -> Clip:
    clip = decode_video(path, num_frames, size, timeout_s=timeout_s)  # VideoDecodeError names file and cause
    if counter is not None:
        ray.get(counter.add.remote(path))
    return clip
