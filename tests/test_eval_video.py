"""Decoding falls back to PyAV for every file decord cannot open or decode, before the video is
rejected: GIFs (TGIF-QA ships GIFs; decord cannot measure their duration) and H.264 clips of a
frame size decord's buffer check refuses (every `vpref synth --size 72` video)."""

import numpy as np
import pytest

from vpref.data.synth import Obj, Scene, position, render
from vpref.data.video import VideoDecodeError, available_backend, decode_in_process, decode_video, write_video

pytestmark = pytest.mark.skipif(available_backend() != "decord", reason="the fallback is from decord")


def _scene(size):
    return Scene((Obj("red", "square", "right", 0, size * 0.25, size * 0.5),), num_frames=12, size=size, fps=8)


def _write_gif(path, frames, fps=8):
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def _square_moves_right(clip, scene):
    for frame, idx in zip(clip.frames, clip.indices):
        x, y = position(scene.objects[0], idx, scene.num_frames, scene.size)
        r, g, b = frame[int(y), int(x)].astype(int)
        assert r > 170 and g < 100 and b < 100, (idx, frame[int(y), int(x)])
    xs = [np.nonzero((f[..., 0] > 170) & (f[..., 1] < 100))[1].mean() for f in clip.frames]
    assert all(b > a for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize("kind", ["gif", "mp4-72px"])
def test_files_decord_fails_on_are_decoded_by_pyav(tmp_path, kind):
    size = 64 if kind == "gif" else 72
    scene = _scene(size)
    path = tmp_path / ("clip.gif" if kind == "gif" else "clip.mp4")
    (_write_gif if kind == "gif" else write_video)(path, render(scene))
    with pytest.raises(VideoDecodeError):  # decord alone: fails to open (GIF) or to decode (72 px)
        decode_in_process(path, 6, backend="decord")
    for clip in (decode_video(path, 6), decode_video(path, 6, timeout_s=None)):  # isolated child and in-process
        assert clip.backend == "pyav" and clip.frames.shape == (6, size, size, 3) and clip.total_frames == 12
        _square_moves_right(clip, scene)


def test_a_file_no_decoder_reads_names_both_failures(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError) as e:
        decode_video(path, 4)
    assert e.value.path == str(path) and "decord also failed" in e.value.cause


def test_decord_still_decodes_what_it_can(tmp_path):
    path = tmp_path / "ok.mp4"
    write_video(path, render(_scene(64)))
    assert decode_video(path, 4).backend == "decord"


def test_decode_samples_keeps_gif_rows(tmp_path):
    """The manifest path: a GIF row is kept, not rejected."""
    from vpref.data.manifest import Sample, decode_samples

    gif = tmp_path / "a.gif"
    _write_gif(gif, render(_scene(64)))
    ok, clips, rejects = decode_samples([Sample("a", str(gif), "What colour is the square?")], 4)
    assert [s.id for s in ok] == ["a"] and not rejects and clips[str(gif)].backend == "pyav"
