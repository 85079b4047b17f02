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

from vpref.utils import quiet_libraries  # noqa: E402

quiet_libraries()


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


@pytest.fixture(scope="session")
def sft_zoo(world, tmp_path_factory) -> Path:
    """Two briefly trained tiny zoo members (policy, other): their answers vary, so pairs exist."""
    from vpref.config import load_config
    from vpref.train.sft import run_sft

    out = tmp_path_factory.mktemp("zoo")
    cfg = load_config(None, [
        f"data.root={world}", f"data.train={world}/train.jsonl", f"data.dev={world}/dev.jsonl",
        f"sft.out={out}", "sft.batch_size=8", "sft.lr=3e-3", "sft.warmup_steps=5",
        "sft.members=[{name: policy, size: 0.2m, steps: 60}, {name: other, size: 0.2m, steps: 30, seed: 1}]",
    ])
    run_sft(cfg)
    return out


_RAY_TMP = None


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One local Ray cluster for the session (address='local': never someone else's cluster)."""
    import ray

    global _RAY_TMP
    if not ray.is_initialized():
        _RAY_TMP = _RAY_TMP or str(tmp_path_factory.mktemp("ray"))
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="vpref",
                 _temp_dir=_RAY_TMP)
    yield ray


def pytest_sessionfinish(session, exitstatus):
    import ray

    if ray.is_initialized():
        ray.shutdown()


def engine_config(world, zoo, out, *extra):
    """A small data-engine config over the test world and zoo."""
    from vpref.config import load_config

    return load_config(None, [
        f"data.root={world}", f"data.train={world}/train.jsonl", f"data.dev={world}/dev.jsonl",
        f"data.test={world}/test.jsonl", f"run.out_dir={out}",
        f"zoo=[{{name: policy, path: '{zoo}/policy', policy: true, batch_size: 8, resources: {{num_cpus: 0.5}},"
        f" sampling: {{temperature: 1.0, n: 2, max_new_tokens: 24}}}},"
        f" {{name: other, path: '{zoo}/other', batch_size: 8, resources: {{num_cpus: 0.5}},"
        f" sampling: {{temperature: 0.7, n: 1, max_new_tokens: 24}}}}]",
        "judge.pool.min=1", "judge.pool.max=2", "judge.pool.batch_size=8", "judge.pool.idle_s=1",
        "pairs.min_margin=0.1", *extra,
    ])
