"""Video decoding: uniformly sampled uint8 frames, one error type, bounded time.

decord is the default decoder (fast seeking); PyAV is the fallback: where decord is not
installed (it is x86-64 Linux only and unmaintained), and for every file decord fails to open or
to decode -- GIFs (decord cannot measure their duration) and frame sizes its buffer check
rejects (a 72x72 H.264 clip) -- before the video is rejected.  Decoding runs in a small child process
so that a file which makes the decoder hang (decord can spin holding the GIL, a path on a dead
network mount blocks in open()) costs the caller `timeout_s` and an error, never a hang.

This module imports no torch, so the child process starts quickly.
"""

from __future__ import annotations

import os
import pickle
import re
import select
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_TIMEOUT_S = 30.0
CRASHED = "decoder process crashed"


class VideoDecodeError(Exception):
    """A video could not be decoded.  `path` names the file, `cause` says why."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")

    def __reduce__(self):  # survive pickling across processes and Ray
        return (VideoDecodeError, (self.path, self.cause))


@dataclass(frozen=True)
class Clip:
    """Frames sampled from one video plus what a model needs to place them in time."""

    frames: np.ndarray  # uint8 (T, H, W, 3)
    indices: tuple[int, ...]  # which source frames were taken
    total_frames: int
    fps: float
    backend: str = ""  # the decoder that produced the frames ('decord' or 'pyav')

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled sequence (what Qwen2.5-VL's temporal positions use)."""
        if self.total_frames <= 0 or self.fps <= 0:
            return self.fps
        return len(self.indices) / self.total_frames * self.fps


def available_backend() -> str:
    """'decord' when it imports, else 'pyav'."""
    try:
        import decord  # noqa: F401

        return "decord"
    except ImportError:
        return "pyav"


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """Centres of `num_frames` equal segments over the video (repeats frames of short videos)."""
    if total_frames <= 0:
        raise ValueError("total_frames must be positive")
    return [min(total_frames - 1, int((i + 0.5) * total_frames / num_frames)) for i in range(num_frames)]


def _size_hw(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VideoDecodeError(path, "file not found") from None
    except PermissionError:
        raise VideoDecodeError(path, "permission denied") from None
    if stat.S_ISDIR(st.st_mode):
        raise VideoDecodeError(path, "is a directory, not a video file")
    if stat.S_ISREG(st.st_mode):
        if st.st_size == 0:
            raise VideoDecodeError(path, "file is empty (0 bytes)")
        if not os.access(path, os.R_OK):
            raise VideoDecodeError(path, "permission denied")


def _decord_message(e: Exception) -> str:
    """decord's first error line without its '[time] source.cc:line:' prefix."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line).replace("ERROR ", "").strip()


def _decode_decord(path: str, num_frames: int, size: tuple[int, int] | None) -> Clip:
    import decord

    kwargs = {"num_threads": 1}
    if size is not None:
        kwargs.update(height=size[0], width=size[1])
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), **kwargs)
    except Exception as e:  # decord raises its own DECORDError for every failure
        msg = _decord_message(e)
        if "video stream" in msg:
            raise VideoDecodeError(path, "no video stream (audio-only, no frames, or not a video)") from None
        raise VideoDecodeError(path, f"corrupt or unsupported video: {msg}") from None
    total = len(vr)
    if total <= 0:
        raise VideoDecodeError(path, "video stream has zero frames")
    fps = float(vr.get_avg_fps() or 0.0)
    idx = sample_indices(total, num_frames)
    try:
        frames = vr.get_batch(idx).asnumpy()
    except Exception as e:
        raise VideoDecodeError(path, f"corrupt video: frames could not be decoded ({e})") from None
    return Clip(np.ascontiguousarray(frames, dtype=np.uint8), tuple(idx), total, fps, "decord")


def _decode_pyav(path: str, num_frames: int, size: tuple[int, int] | None) -> Clip:
    import av

    try:
        container = av.open(path)
    except Exception as e:
        raise VideoDecodeError(path, f"corrupt or unsupported video: {e}") from None
    with container:
        if not container.streams.video:
            raise VideoDecodeError(path, "no video stream (audio-only, no frames, or not a video)")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 0.0)
        kw = {"format": "rgb24"}
        if size is not None:
            kw.update(height=size[0], width=size[1])
        try:
            # A sequential decode is exact and cheap for the short clips VQA uses, and it counts
            # the frames that really decode (container headers are often wrong).
            decoded = [f.to_ndarray(**kw) for f in container.decode(stream)]
        except Exception as e:
            raise VideoDecodeError(path, f"corrupt video: frames could not be decoded ({e})") from None
    if not decoded:
        raise VideoDecodeError(path, "video stream has zero frames")
    idx = sample_indices(len(decoded), num_frames)
    return Clip(np.stack([decoded[i] for i in idx]).astype(np.uint8), tuple(idx), len(decoded), fps, "pyav")


_DECODERS = {"decord": _decode_decord, "pyav": _decode_pyav}


def backends_to_try(backend: str | None) -> list[str]:
    """None (the default): decord, then PyAV when decord fails; a named backend: only that one."""
    if backend is None:
        return ["decord", "pyav"] if available_backend() == "decord" else ["pyav"]
    if backend not in _DECODERS:
        raise ValueError(f"unknown video backend {backend!r}: use 'decord' or 'pyav' (or None: decord, then PyAV)")
    return [backend]


def decode_in_process(
    path: str | os.PathLike, num_frames: int, size=None, backend: str | None = None
) -> Clip:
    """Decode without isolation (use only on trusted files, or inside the decode child)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    p = Path(path)
    _check_file(p)
    hw = _size_hw(size)
    failed: list[tuple[str, str]] = []
    for name in backends_to_try(backend):
        try:
            return _DECODERS[name](str(p), num_frames, hw)
        except VideoDecodeError as e:
            failed.append((name, e.cause))
    if len(failed) == 1:
        raise VideoDecodeError(p, failed[0][1])
    # Every decoder failed: the last one's reason first (it is the most forgiving), then the others'.
    last, *rest = reversed(failed)
    raise VideoDecodeError(p, f"{last[1]} ({'; '.join(f'{n} also failed: {c}' for n, c in rest)})")


# ----------------------------------------------------------------------------- isolation
# The child is a plain `python -m vpref.data._decode_child` process talking pickles over a pipe.
# multiprocessing's spawn would re-import the caller's __main__ (a Ray worker's, say), which is
# neither safe nor cheap.


class _DecodeWorker:
    """One long-lived decode child per caller process, replaced when a decode times out."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.crashes = 0  # children that died mid-decode (each decode was tried again, see decode_video)

    def _start(self) -> None:
        env = dict(os.environ)
        pkg_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vpref.data._decode_child"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5)
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()
        self._proc = None

    def decode(self, path: str, num_frames: int, size, backend, timeout_s: float) -> Clip:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            proc = self._proc
            try:
                send_msg(proc.stdin, (path, num_frames, size, backend))
                status, payload = recv_msg(proc.stdout, timeout_s)
            except TimeoutError:
                self._kill()
                raise VideoDecodeError(path, f"decoder did not finish within {timeout_s:g}s (hung or too slow)")
            except (EOFError, BrokenPipeError, OSError):
                self._kill()
                self.crashes += 1
                raise VideoDecodeError(path, CRASHED) from None
        if status == "err":
            raise VideoDecodeError(*payload)
        return payload


def send_msg(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def recv_msg(stream, timeout_s: float | None = None):
    fd = stream.fileno()
    header = _read_exact(fd, 8, timeout_s)
    return pickle.loads(_read_exact(fd, struct.unpack("<Q", header)[0], timeout_s))


def _read_exact(fd: int, n: int, timeout_s: float | None) -> bytes:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


_worker = _DecodeWorker()


def decode_video(
    path: str | os.PathLike,
    num_frames: int,
    size: int | tuple[int, int] | None = None,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    backend: str | None = None,
) -> Clip:
    """Sample `num_frames` frames uniformly from `path`.

    `size` resizes frames to (height, width) (an int means square).  `timeout_s=None` decodes in
    this process (faster, but a hanging file then hangs the caller).  Every failure raises
    `VideoDecodeError` naming the file and the cause.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    p = Path(path)
    _check_file(p)  # cheap checks here, so the common errors need no round trip
    if timeout_s is None:
        return decode_in_process(p, num_frames, size, backend)
    try:
        return _worker.decode(str(p), num_frames, _size_hw(size), backend, timeout_s)
    except VideoDecodeError as e:
        # decord can take the child down with it (a native crash, not an exception the child
        # could catch and fall back from): try PyAV alone once before giving up on the file.
        if e.cause != CRASHED or len(backends_to_try(backend)) < 2:
            raise
        try:
            return _worker.decode(str(p), num_frames, _size_hw(size), "pyav", timeout_s)
        except VideoDecodeError as e2:
            raise VideoDecodeError(p, f"{e2.cause} (decord also failed: {CRASHED})") from None


def read_frames(path, num_frames: int, size=None, **kwargs) -> np.ndarray:
    """uint8 array (T, H, W, 3) of `num_frames` uniformly sampled frames; see `decode_video`."""
    return decode_video(path, num_frames, size, **kwargs).frames


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
    """Write uint8 (T, H, W, 3) frames as an H.264 mp4 with PyAV."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got shape {frames.shape}")
    t, h, w, _ = frames.shape
    tmp = Path(str(path) + ".tmp.mp4")
    with av.open(str(tmp), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # Near-lossless keeps small coloured shapes crisp; synthetic clips are a few KB anyway.
        stream.options = {"crf": "10", "preset": "veryfast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)
