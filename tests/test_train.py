"""DPO as a real Ray Train job on 2 CPU workers (gloo): a worker killed mid-training is
restarted and training resumes from the last checkpoint; DeepSpeed ZeRO-2 + LoRA runs too."""

import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vpref.config import DataConfig, DPOConfig
from vpref.data.manifest import load_manifest
from vpref.data.schema import Pair, pair_id, write_shard
from vpref.data.world import perturb
from vpref.train.checkpoint import load_state_dict
from vpref.train.dpo import reference_logps, train_dpo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs_ref(ray_local, world, sft_zoo, tmp_path_factory):
    """Pairs (gold answer vs a perturbed one) with reference log-probs from the SFT policy."""
    out = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    pairs = []
    for s in load_manifest(world / "train.jsonl").samples[:48]:
        bad = perturb(s.answer, rng)
        pid = pair_id(f"{s.id}:c", f"{s.id}:r")
        pairs.append(Pair(pid, s.question, s.answer, bad, s.video, s.id, s.family, 1, 0, f"{s.id}:c", f"{s.id}:r",
                          "gold", "noisy", 5.0, 1.0, 4.0, {}, {}, "", "", {}, {}, 5, 5, "test", "test", "t", "t", "off"))
    write_shard(out, "pairs", pairs)
    path = reference_logps(sft_zoo / "policy", out, out / "pairs_ref.parquet", DataConfig(), batch_size=16, shards=2)
    table = pq.read_table(path)
    assert table.num_rows == 48 and all(np.isfinite(table.column("ref_chosen_logp").to_numpy()))
    return path


def test_a_worker_killed_mid_training_is_restarted_and_resumes_from_the_checkpoint(pairs_ref, sft_zoo, tmp_path):
    cfg = DPOConfig(num_workers=2, batch_size=4, epochs=8, lr=1e-3, checkpoint_every=2, max_failures=2)
    progress = tmp_path / "train" / "progress"
    storage = tmp_path / "train" / "ray_train" / "kill-test"
    killed = {}

    def kill_rank1_once_a_checkpoint_is_registered():
        # Ray Train's controller registers a reported checkpoint when it next polls the workers
        # (every 2 s): a checkpoint older than that is the one a restart resumes from.
        deadline = time.time() + 180
        while time.time() < deadline and not list(storage.glob("checkpoint_*")):
            time.sleep(0.05)
        time.sleep(3.0)
        st = json.loads((progress / "rank1.json").read_text())
        os.kill(st["pid"], signal.SIGKILL)
        killed.update(st)

    t = threading.Thread(target=kill_rank1_once_a_checkpoint_is_registered, daemon=True)
    t.start()
    sigint = signal.getsignal(signal.SIGINT)
    res = train_dpo(cfg, DataConfig(), sft_zoo / "policy", pairs_ref, tmp_path / "train", name="kill-test")
    t.join(timeout=5)
    # Ray Train, fit from the main thread, swaps in its own SIGINT handler for good (Ctrl-C then ended
    # `vpref run` with exit 1 and no message, or did nothing): the job leaves Ctrl-C to the caller
    assert signal.getsignal(signal.SIGINT) is sigint
    assert killed, "no worker was killed"
    total = cfg.epochs * (24 // cfg.batch_size)  # 48 pairs over 2 workers, 4 per step
    assert killed["step"] < total
    assert res.restarts >= 1 and [m["step"] for m in res.metrics] == list(range(1, total + 1))
    after = json.loads((progress / "rank0.json").read_text())
    assert after["step"] == total and after["resumed_from"] in range(2, total, 2)  # from a checkpoint, not from 0
    assert after["pid"] != killed["pid"]
    assert all(np.isfinite(m["loss"]) for m in res.metrics)
    assert res.metrics[-1]["rewards/margin"] > res.metrics[0]["rewards/margin"]  # it learned to prefer chosen
    # The export is an HF safetensors folder that from_pretrained loads, and it moved.
    trained, init = load_state_dict(res.checkpoint), load_state_dict(sft_zoo / "policy")
    assert set(trained) == set(init) and any(not torch.equal(trained[k], init[k]) for k in init)
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(res.checkpoint)


def test_deepspeed_zero2_with_lora_on_cpu_exports_a_merged_checkpoint(pairs_ref, sft_zoo, tmp_path):
    cfg = DPOConfig(num_workers=2, batch_size=4, epochs=1, lr=2e-3, strategy="deepspeed", zero_stage=2,
                    lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    res = train_dpo(cfg, DataConfig(), sft_zoo / "policy", pairs_ref, tmp_path / "ds", name="ds-test")
    trained, init = load_state_dict(res.checkpoint), load_state_dict(sft_zoo / "policy")
    assert set(trained) == set(init)  # LoRA merged: plain model tensors, no adapter weights
    changed = [k for k in init if not torch.equal(trained[k], init[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)  # only the adapted projections
    assert len(res.metrics) == 6 and all(np.isfinite(m["loss"]) for m in res.metrics)
