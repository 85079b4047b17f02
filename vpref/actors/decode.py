"""Decode once: each video of a build is decoded by one call to a long-lived decoder actor, and
its frames are shared through the object store with every generator (and judge) that needs them.

Long-lived actors rather than tasks: a task per video makes Ray start a fresh worker process per
concurrent task (each importing Ray and spawning its decode child), which on a small machine
costs far more than the decoding itself.
"""

from __future__ import annotations

import itertools

import ray

from vpref.actors.placement import main_options
from vpref.data.video import Clip, VideoDecodeError, decode_video

CRASH = "decoder process crashed"  # the cause vpref.data.video gives when its decode child dies mid-decode
CRASH_RETRIES = 2  # a crash is retried in a fresh child; a file that crashes it every time is then rejected
DECODER_CPUS = 0.25  # each decoder actor's CPU request


class VideoDecoder:
    def __init__(self, num_frames: int, size, timeout_s: float):
        self.num_frames, self.size, self.timeout_s = num_frames, size, timeout_s
        self.decodes = 0
        self.by_video: dict[str, int] = {}

    def decode(self, path: str) -> Clip:
        """The clip, or VideoDecodeError naming the file and the cause.  A decode child that died
        (killed, out of memory, a segfault in the decoder library) is no verdict on the file: the
        decode is retried in a fresh child, and only a file that kills it every time is rejected."""
        self.decodes += 1  # counted where it happens: a retried call counts again
        self.by_video[path] = self.by_video.get(path, 0) + 1
        for attempt in range(1 + CRASH_RETRIES):
            try:
                return decode_video(path, self.num_frames, self.size, timeout_s=self.timeout_s)
            except VideoDecodeError as e:
                if not e.cause.startswith(CRASH):
                    raise
                print(f"decoder: the decode child crashed on {path} (attempt {attempt + 1}); retrying", flush=True)
        raise VideoDecodeError(path, f"{CRASH} on each of {1 + CRASH_RETRIES} attempts (the file crashes the decoder)")

    def child_pid(self) -> int | None:
        """The pid of this actor's decode child process (None before the first decode)."""
        from vpref.data import video

        proc = video._worker._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def counts(self) -> dict:
        from vpref.data import video

        # crashes: every decode child that died in this actor (decode_video retries one with PyAV
        # itself, so not all of them reach the retry loop above)
        return {"decodes": self.decodes, "by_video": self.by_video, "crashes": video._worker.crashes}


RemoteDecoder = ray.remote(VideoDecoder)


class DecoderPool:
    """A few decoder actors; `submit` returns the ObjectRef of a Clip."""

    def __init__(self, data, n: int = 2, namespace: str | None = None):
        self.actors = [RemoteDecoder.options(name=f"decoder-{i}", namespace=namespace, num_cpus=DECODER_CPUS,
                                             max_restarts=-1, max_task_retries=-1, **main_options())
                       .remote(data.num_frames, data.frame_size, data.decode_timeout_s) for i in range(n)]
        self._next = itertools.cycle(self.actors)
        self._baseline = self._totals()

    def submit(self, path: str) -> ray.ObjectRef:
        return next(self._next).decode.remote(path)

    def _totals(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for c in ray.get([a.counts.remote() for a in self.actors]):
            for v, n in c["by_video"].items():
                total[v] = total.get(v, 0) + n
        return total

    def counts_since_start(self) -> dict:
        """Decodes since this pool (or the last `reset`) started: total, videos, most per video."""
        now = self._totals()
        delta = {v: n - self._baseline.get(v, 0) for v, n in now.items() if n - self._baseline.get(v, 0)}
        return {"decodes": sum(delta.values()), "videos": len(delta), "max_per_video": max(delta.values(), default=0)}

    def reset(self) -> None:
        self._baseline = self._totals()

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
