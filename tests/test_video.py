import os
import time

import av
import numpy as np
import pytest

from vpref.data.synth import Obj, Scene, position, render
from vpref.data.video import VideoDecodeError, available_backend, decode_video, read_frames, sample_indices, write_video

BACKENDS = ["decord", "pyav"] if available_backend() == "decord" else ["pyav"]


def _scene():
    return Scene((Obj("red", "square", "right", 0, 15.0, 32.0),), num_frames=12, size=64, fps=8)


@pytest.fixture(scope="module")
def moving_square(tmp_path_factory):
    path = tmp_path_factory.mktemp("v") / "square.mp4"
    write_video(path, render(_scene()), fps=8)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_decodes_uniformly_sampled_frames(moving_square, backend):
    clip = decode_video(moving_square, 6, backend=backend)
    assert clip.frames.shape == (6, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.total_frames == 12 and clip.fps == pytest.approx(8.0)
    assert list(clip.indices) == sample_indices(12, 6) == [1, 3, 5, 7, 9, 11]
    # The frames are the scene's frames: the red square is where the renderer put it.
    scene = _scene()
    for frame, idx in zip(clip.frames, clip.indices):
        x, y = position(scene.objects[0], idx, 12, 64)
        r, g, b = frame[int(y), int(x)].astype(int)
        assert r > 180 and g < 90 and b < 90, (idx, frame[int(y), int(x)])
    # ...and it moves right.
    xs = [np.nonzero((f[..., 0] > 180) & (f[..., 1] < 90))[1].mean() for f in clip.frames]
    assert all(b > a for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_and_short_videos(moving_square, backend):
    assert read_frames(moving_square, 4, size=32, backend=backend).shape == (4, 32, 32, 3)
    assert read_frames(moving_square, 4, size=(24, 40), backend=backend).shape == (4, 24, 40, 3)
    # Asking for more frames than the video has repeats frames rather than failing.
    clip = decode_video(moving_square, 20, backend=backend)
    assert clip.frames.shape[0] == 20 and max(clip.indices) == 11


def test_decoders_agree(moving_square):
    if len(BACKENDS) < 2:
        pytest.skip("decord is not installed here")
    a = read_frames(moving_square, 8, backend="decord").astype(int)
    b = read_frames(moving_square, 8, backend="pyav").astype(int)
    assert np.abs(a - b).mean() < 2.0


def _audio_only(path):
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            out.mux(p)
        for p in s.encode():
            out.mux(p)


def _zero_frames(path):
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=8)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        out.start_encoding()  # header written, no frame ever encoded


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make,cause",
    [
        (None, "file not found"),
        (lambda p: p.write_bytes(b""), "file is empty"),
        (lambda p: p.write_bytes(os.urandom(4000)), "corrupt"),
        (lambda p: p.mkdir(), "is a directory"),
        (_audio_only, "no video stream"),
        (_zero_frames, "video stream"),
    ],
    ids=["missing", "empty", "garbage", "directory", "audio-only", "zero-frames"],
)
def test_broken_files_raise_one_error_naming_file_and_cause(tmp_path, make, cause, backend):
    path = tmp_path / "broken.mp4"
    if make:
        make(path)
    with pytest.raises(VideoDecodeError) as e:
        decode_video(path, 4, backend=backend)
    assert e.value.path == str(path) and str(path) in str(e.value)
    assert cause in e.value.cause and e.value.cause


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_file(moving_square, tmp_path, backend):
    data = moving_square.read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="truncated.mp4"):
        decode_video(path, 4, backend=backend)


def test_a_hanging_file_costs_the_timeout_not_a_hang(tmp_path, moving_square):
    # Opening a FIFO blocks until a writer appears: the same as a video on a dead network mount.
    fifo = tmp_path / "hangs.mp4"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(VideoDecodeError, match="did not finish within 1.5s"):
        decode_video(fifo, 4, timeout_s=1.5)
    assert time.monotonic() - t0 < 10
    # The decoder is replaced, and the next video decodes normally.
    assert read_frames(moving_square, 4).shape == (4, 64, 64, 3)


def test_errors_survive_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(VideoDecodeError("/x.mp4", "corrupt video")))
    assert (e.path, e.cause) == ("/x.mp4", "corrupt video")
