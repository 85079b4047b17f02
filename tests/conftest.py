"""Shared fixtures: a small synthetic world and tiny checkpoints, built once per session.

Everything is real: mp4 files written with PyAV, decoded with decord, Qwen2.5-VL checkpoints
saved with save_pretrained and loaded through the same path a real checkpoint takes.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A 30-video synthetic world (train/dev/test manifests + mp4s)."""
    from vpref.data.synth import SynthSpec, synthesize

    out = tmp_path_factory.mktemp("world")
    synthesize(out, SynthSpec(n=30, seed=7))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from vpref.models.tiny import rubric_corpus, train_tokenizer, world_corpus

    return train_tokenizer(world_corpus(60) + rubric_corpus(), 1024)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random-weight 1M-parameter Qwen2.5-VL checkpoint folder."""
    from vpref.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-1m", "1m", seed=0, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_vlm(tiny_ckpt):
    from vpref.models.video_lm import VideoLM

    return VideoLM.load(tiny_ckpt)


@pytest.fixture(scope="session")
def clip(world):
    from vpref.data.video import decode_video

    return decode_video(next((world / "videos").glob("*.mp4")), 8)
