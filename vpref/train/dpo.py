"""DPO as a Ray Train job.

* `reference_logps`: the reference model's sequence log-probs of every chosen and rejected
  answer, computed once per round (Ray tasks) and stored beside the pairs -- so training holds
  one model, not two.
* `train_loop`: the per-worker loop (DDP on gloo/nccl, or DeepSpeed ZeRO); one forward over
  chosen and rejected together; a checkpoint every `checkpoint_every` steps; resumes from the
  latest checkpoint after a worker failure.
* `train_dpo`: builds the TorchTrainer (ScalingConfig, RunConfig storage, CheckpointConfig,
  FailureConfig), runs it, exports the result as an HF safetensors folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from vpref.actors.placement import main_options
from vpref.config import DataConfig, DPOConfig
from vpref.data.schema import read_table
from vpref.train.job import deepspeed_config as _deepspeed_config
from vpref.train.job import lr_factor as _lr_factor

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", "rejected_tokens")


# --------------------------------------------------------------------------- shared helpers


def _load_parts(path: str | Path, dtype=torch.float32):
    """(model, processor, family) of a checkpoint of any registered family."""
    from transformers import AutoModelForImageTextToText

    from vpref.models.families import family_of

    family = family_of(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    return model, family.load_processor(path), family


class _Clips:
    """Decoded clips of the videos a worker trains on, each decoded once."""

    def __init__(self, data: DataConfig):
        self.data, self.cache = data, {}

    def __call__(self, path: str):
        from vpref.data.video import decode_video

        if path not in self.cache:
            self.cache[path] = decode_video(path, self.data.num_frames, self.data.frame_size,
                                            timeout_s=self.data.decode_timeout_s)
        return self.cache[path]


def pair_batch(vlm, clips: _Clips, rows: list[dict]):
    """One scoring batch holding the chosen answers, then the rejected ones (one forward)."""
    cl = [clips(r["video"]) for r in rows]
    frames, fps = [c.frames for c in cl] * 2, [c.sampled_fps for c in cl] * 2
    questions = [r["prompt"] for r in rows] * 2
    answers = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    return vlm.scoring_batch(frames, questions, answers, fps=fps)


def logps_and_counts(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    from vpref.models.video_lm import sequence_logps

    return sequence_logps(model, batch), batch.response_mask[:, 1:].sum(-1).to(torch.float32)


def pair_loss(model, batch, rows: list[dict], cfg: DPOConfig):
    """The DPO step's forward: log-probs of a `pair_batch` (chosen, then rejected) against the
    rows' stored reference log-probs -> DPOOutput (backpropagate `.loss`)."""
    from vpref.train.losses import dpo_loss

    b = len(rows)
    lp, n = logps_and_counts(model, batch)
    ref = torch.tensor([[r["ref_chosen_logp"], r["ref_rejected_logp"]] for r in rows], device=lp.device)
    return dpo_loss(lp[:b], lp[b:], ref[:, 0], ref[:, 1], cfg.loss, cfg.beta, cfg.label_smoothing, n[:b], n[b:],
                    cfg.nll_coef)


def freeze_unused(model, batch) -> list[str]:
    """Freeze the trainable parameters a video forward leaves without gradient, and name them.

    Some families' towers have parameters video inputs never reach (SigLIP/CLIP's post-layernorm
    and any layer past `vision_feature_layer`, LLaVA-NeXT-Video's image newline).  DDP refuses
    such parameters (`find_unused_parameters=False`) and ZeRO's gradient buckets wait for them;
    they would get no gradient anyway, so freezing them leaves training unchanged.  One probe
    forward + backward on a real batch finds them, whatever the family or LoRA setup (the
    training loop runs it before wrapping the model for more than one worker)."""
    from vpref.models.video_lm import sequence_logps

    model.zero_grad(set_to_none=True)
    sequence_logps(model, batch).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        if n in unused:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    return unused


# --------------------------------------------------------------------------- reference log-probs


def score_pairs(vlm, rows: list[dict], data: DataConfig, batch_size: int) -> list[tuple]:
    """(pair_id, logp chosen, logp rejected, chosen tokens, rejected tokens) under `vlm`'s model."""
    clips, out = _Clips(data), []
    vlm.model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            lp, n = logps_and_counts(vlm.model, pair_batch(vlm, clips, chunk).to(vlm.device))
            b = len(chunk)
            out += [(r["pair_id"], lp[k].item(), lp[b + k].item(), n[k].item(), n[b + k].item())
                    for k, r in enumerate(chunk)]
    return out


@ray.remote
def _reference_shard(ref_path: str, rows: list[dict], data: dict, batch_size: int) -> list[tuple]:
    from vpref.models.video_lm import VideoLM
    from vpref.utils import quiet_libraries

    quiet_libraries()
    model, processor, family = _load_parts(ref_path)
    if torch.cuda.is_available():  # the task asked for a GPU (dpo.use_gpu)
        model.to("cuda")
    return score_pairs(VideoLM(model, processor, ref_path, family), rows, DataConfig.model_validate(data), batch_size)


def reference_logps(ref_path: str | Path, pairs_dir: str | Path, out_path: str | Path, data: DataConfig,
                    batch_size: int = 16, shards: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
                    actors: list | None = None) -> Path:
    """pairs + (ref_chosen_logp, ref_rejected_logp, chosen_tokens, rejected_tokens) -> out_path.

    `actors`: generator actors that already hold the reference weights (the default reference is
    the previous policy, which the policy's generators hold): they score the pairs, no model is
    loaded again.  Otherwise `shards` Ray tasks load `ref_path` and score their share.
    """
    table = read_table(pairs_dir, "pairs").sort_by("pair_id")
    rows = table.select(["pair_id", "prompt", "chosen", "rejected", "video"]).to_pylist()
    if not rows:
        raise ValueError(f"{pairs_dir} has no pairs to train on")
    if actors:
        refs = [a.score_pairs.remote(rows[k::len(actors)], data.model_dump(), batch_size) for k, a in enumerate(actors)]
    else:
        shards = max(1, min(shards, len(rows)))
        refs = [_reference_shard.options(num_cpus=num_cpus, num_gpus=num_gpus, **main_options()).remote(
            str(ref_path), rows[k::shards], data.model_dump(), batch_size) for k in range(shards)]
    got = {pid: v for part in ray.get(refs) for pid, *v in part}
    cols = list(zip(*(got[pid] for pid in table.column("pair_id").to_pylist())))
    for name, values in zip(REF_COLUMNS, cols):
        table = table.append_column(name, pa.array(values, pa.float64()))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_path)
    return out_path


# --------------------------------------------------------------------------- the worker loop


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker.  `config`: dpo (DPOConfig), data (DataConfig), init (HF
    folder), pairs (Parquet with reference log-probs), progress_dir, seed."""
    import ray.train
    import torch.distributed as dist

    from vpref.models.video_lm import VideoLM
    from vpref.utils import log, quiet_libraries

    quiet_libraries()
    cfg, data = DPOConfig.model_validate(config["dpo"]), DataConfig.model_validate(config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = dist.is_available() and dist.is_initialized()
    torch.manual_seed(config["seed"] + rank)
    progress = Path(config["progress_dir"])
    progress.mkdir(parents=True, exist_ok=True)

    # Data: the same sorted pairs on every worker, sharded by rank, equal shard sizes so every
    # rank runs the same number of steps (reports are barriers).
    rows = pq.read_table(config["pairs"]).sort_by("pair_id").to_pylist()
    per_rank = len(rows) // world
    if per_rank == 0:
        raise ValueError(f"{len(rows)} pairs cannot feed {world} workers; use fewer dpo.num_workers")
    shard = rows[rank::world][:per_rank]
    micro = cfg.batch_size
    micro_per_epoch = math.ceil(per_rank / micro)
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch
    every = cfg.checkpoint_every or steps_per_epoch

    model, processor, family = _load_parts(config["init"])
    if cfg.freeze_vision:
        for p in family.vision_tower(model).parameters():
            p.requires_grad_(False)
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model

        model = get_peft_model(model, PeftLora(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                               target_modules=cfg.lora.target_modules))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    clips = _Clips(data)
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.use_gpu and torch.cuda.is_available() else None
    # DDP refuses parameters that get no gradient, and ZeRO-1/2's buckets wait for them
    # (deepspeedai/DeepSpeed#777); ZeRO-3 partitions first, so the full model is never on one device.
    if world > 1 and (cfg.strategy == "ddp" or cfg.zero_stage < 3):
        model.to(device or "cpu")
        probe = pair_batch(VideoLM(model, processor, config["init"], family), clips, shard[:2])
        unused = freeze_unused(model, probe.to(device or "cpu"))
        if unused and rank == 0:
            log(f"dpo: {len(unused)} parameters get no gradient from video inputs, frozen: {unused[:4]}")
    params = [p for p in model.parameters() if p.requires_grad]

    start, resumed_from = 0, None
    ckpt = ray.train.get_checkpoint()
    state_dir = None
    if ckpt is not None:  # a restart after a failure: continue where the last checkpoint left off
        state_dir = Path(ckpt.to_directory())
        state = json.loads((state_dir / "trainer_state.json").read_text())
        start = resumed_from = state["step"]
        if cfg.strategy == "ddp":
            model.load_state_dict(torch.load(state_dir / "model_state.pt", weights_only=True))

    if cfg.strategy == "deepspeed":
        import deepspeed

        client_opt = None if cfg.offload_optimizer else torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=client_opt,
                                                 config=_deepspeed_config(cfg))
        if state_dir is not None:
            engine.load_checkpoint(str(state_dir / "deepspeed"))
        forward_model, unwrapped = engine, engine.module
    else:
        forward_model = ray.train.torch.prepare_model(model) if world > 1 or device is not None else model
        unwrapped = model
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if state_dir is not None:
            opt.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
    model_device = next(unwrapped.parameters()).device
    vlm = VideoLM(forward_model, processor, config["init"], family)
    warmup = int(cfg.warmup_ratio * total)
    metrics_file = progress / "metrics.jsonl"

    def micro_batches(step: int):
        epoch, k = divmod(step, steps_per_epoch)
        order = np.random.default_rng([config["seed"], epoch, rank]).permutation(per_rank)
        for m in range(cfg.grad_accum):
            i = (k * cfg.grad_accum + m) * micro % per_rank
            yield [shard[j] for j in order[i:i + micro]] or [shard[order[0]]]

    forward_model.train()
    for step in range(start, total):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, total, warmup)
        t0 = time.perf_counter()
        logs = []
        for rows_mb in micro_batches(step):
            out = pair_loss(forward_model, pair_batch(vlm, clips, rows_mb).to(model_device), rows_mb, cfg)
            if cfg.strategy == "deepspeed":
                engine.backward(out.loss)
                engine.step()
            else:
                (out.loss / cfg.grad_accum).backward()
            logs.append(out.metrics())
        if cfg.strategy != "deepspeed":
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        m = {k: float(np.mean([x[k] for x in logs])) for k in logs[0]}
        if distributed:  # the logged numbers are the mean over workers
            vec = torch.tensor(list(m.values()), dtype=torch.float64, device=model_device)
            dist.all_reduce(vec)
            m = dict(zip(m, (vec / world).tolist()))
        m.update(step=step + 1, epoch=step // steps_per_epoch, lr=opt.param_groups[0]["lr"],
                 seconds=time.perf_counter() - t0)
        (progress / f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), "step": step + 1,
                                                               "resumed_from": resumed_from}))
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(m) + "\n")
        if (step + 1) % every == 0 or step + 1 == total:
            _report(cfg, m, step + 1, total, resumed_from, unwrapped, forward_model, opt, processor, rank)


def _report(cfg, metrics, step, total, resumed_from, model, forward_model, opt, processor, rank) -> None:
    """Checkpoint (resume state; at the end also the HF export) and report it (every rank)."""
    from vpref.train.job import save_and_report

    save_and_report(cfg, metrics, step, total, resumed_from, model, forward_model, opt, rank,
                    export=lambda out: _export_hf(cfg, model, processor, out))


def _export_hf(cfg, model, processor, out: Path) -> None:
    """The trained policy as an HF safetensors folder (LoRA merged); rank 0, parameters gathered."""
    from vpref.models.video_processors import save_processor

    export = model
    if cfg.lora.enabled:
        import copy

        export = copy.deepcopy(model).merge_and_unload()
    export.save_pretrained(out)
    save_processor(processor, out)  # tokenizer, chat template, processor (genuine class names)


# --------------------------------------------------------------------------- the job


@dataclass
class DPOResult:
    checkpoint: str  # HF folder of the trained policy
    metrics: list[dict]  # one entry per optimizer step (mean over workers)
    seconds: float
    restarts: int

    def final(self) -> dict:
        return self.metrics[-1] if self.metrics else {}


def train_dpo(dpo: DPOConfig, data: DataConfig, init: str | Path, pairs: str | Path, out_dir: str | Path,
              name: str, seed: int = 0) -> DPOResult:
    """Run DPO on Ray Train and export the result to `out_dir/policy` (HF safetensors)."""
    from vpref.train.job import copy_export, fit, read_progress

    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    progress = out / "progress"
    config = {"dpo": dpo.model_dump(), "data": data.model_dump(), "init": str(Path(init).resolve()),
              "pairs": str(Path(pairs).resolve()), "progress_dir": str(progress), "seed": seed}
    result = fit(train_loop, config, dpo, out, name)
    policy = copy_export(result, out / "policy")
    metrics, restarts = read_progress(progress)
    return DPOResult(str(policy), metrics, time.perf_counter() - t0, restarts)
