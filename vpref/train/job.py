"""Ray Train machinery shared by the training jobs (DPO, the reward model).

Driver side: `fit` builds the TorchTrainer (ScalingConfig, RunConfig storage under the job's
folder, CheckpointConfig, FailureConfig) and runs it; `read_progress` collects the per-step
metrics a job's rank 0 appended (the steps a restart ran again counted once).

Worker side: `restore` finds the checkpoint a restarted worker resumes from, `wrap` puts the
model under DDP or DeepSpeed with its optimizer (and reloads their state), `save_and_report`
writes a resume checkpoint (and, at the end, the exported model) and reports it -- every rank,
since `ray.train.report` is a barrier.

A job config (DPOConfig, RMConfig) has the same training keys: num_workers, cpus_per_worker,
use_gpu, gpus_per_worker, strategy, zero_stage, bf16, offload_optimizer, batch_size, grad_accum,
lr, weight_decay, max_grad_norm, max_failures.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

# --------------------------------------------------------------------------- the job (driver)


def fit(train_loop, config: dict, job, out_dir: str | Path, name: str):
    """Run `train_loop(config)` on `job.num_workers` Ray Train workers; storage `out_dir/ray_train`
    (re-running with the same name resumes from its latest checkpoint).  Returns the Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if job.num_workers == 0:
        raise ValueError("num_workers=0 is not supported by a Ray Train job; use >= 1 worker")
    from vpref.actors.placement import main_selector

    out = Path(out_dir).resolve()
    resources = {"CPU": job.cpus_per_worker, **({"GPU": job.gpus_per_worker} if job.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu,
                                     resources_per_worker=resources, label_selector=main_selector()),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=str(out / "ray_train"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
    )
    result = fit_interruptibly(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} produced no checkpoint (see {out / 'ray_train'})")
    return result


def fit_interruptibly(trainer):
    """`trainer.fit()` in a helper thread, so that Ctrl-C is a KeyboardInterrupt in the caller.

    Called from the main thread, Ray Train replaces the process's SIGINT handler with its own for
    good: a Ctrl-C during a job aborted it and ended the process with exit code 1 and no message,
    and any Ctrl-C after the first job (an eval, the next round's build) did nothing but call
    sys.exit inside whatever was running.  From another thread it registers none.  On an interrupt
    the run is left to its owner: the command line ends its cluster, and on a cluster the
    controller, an actor of this driver, ends with it; a later run resumes from its checkpoint."""
    import threading

    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    t = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    t.start()
    while t.is_alive():
        t.join(timeout=1.0)  # a short wait, so a signal is seen at once
    if "error" in box:
        raise box["error"]
    return box["result"]


def copy_export(result, dest: str | Path) -> Path:
    """The model the job exported into its last checkpoint (`<checkpoint>/model`), copied to
    `dest` (replacing what was there)."""
    import shutil

    dest = Path(dest)
    with result.checkpoint.as_directory() as d:
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(Path(d) / "model", dest)
    return dest


def read_progress(progress_dir: str | Path, file: str = "metrics.jsonl") -> tuple[list[dict], int]:
    """(metrics per step, restarts): after a restart the steps since the last checkpoint run again."""
    path = Path(progress_dir) / file
    metrics = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    restarts = sum(1 for a, b in zip(metrics, metrics[1:]) if b["step"] <= a["step"])
    return dedupe_steps(metrics), restarts


def dedupe_steps(metrics: list[dict], key: str = "step") -> list[dict]:
    """Keep the last run of each step."""
    by_step = {}
    for m in metrics:
        by_step[m[key]] = m
    return [by_step[k] for k in sorted(by_step)]


def deepspeed_config(job) -> dict:
    zero: dict = {"stage": job.zero_stage}
    if job.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    ds = {
        "train_micro_batch_size_per_gpu": job.batch_size,
        "gradient_accumulation_steps": job.grad_accum,
        "gradient_clipping": job.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": job.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if job.offload_optimizer:  # CPU offload needs DeepSpeed's own (CPU) Adam
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": job.lr, "weight_decay": job.weight_decay}}
    return ds


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


# --------------------------------------------------------------------------- the worker


def restore() -> tuple[Path | None, int, int | None]:
    """(checkpoint folder, first step, step resumed from) of this attempt: a restart after a
    failure continues where the last reported checkpoint left off."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, 0, None
    state_dir = Path(ckpt.to_directory())
    step = json.loads((state_dir / "trainer_state.json").read_text())["step"]
    return state_dir, step, step


def wrap(job, model, params: list, state_dir: Path | None, device) -> tuple:
    """(forward model, optimizer, DeepSpeed engine or None), with their state reloaded from
    `state_dir`.  DDP only when there is more than one worker or a GPU."""
    import ray.train

    if job.strategy == "deepspeed":
        import deepspeed

        client_opt = None if job.offload_optimizer else torch.optim.AdamW(params, lr=job.lr,
                                                                          weight_decay=job.weight_decay)
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=client_opt,
                                                 config=deepspeed_config(job))
        if state_dir is not None:
            engine.load_checkpoint(str(state_dir / "deepspeed"))
        return engine, opt, engine
    if state_dir is not None:
        model.load_state_dict(torch.load(state_dir / "model_state.pt", weights_only=True))
    world = ray.train.get_context().get_world_size()
    forward_model = ray.train.torch.prepare_model(model) if world > 1 or device is not None else model
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=job.weight_decay)
    if state_dir is not None:
        opt.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
    return forward_model, opt, None


def backward(engine, loss: torch.Tensor, grad_accum: int) -> None:
    if engine is not None:
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer itself at accumulation boundaries
    else:
        (loss / grad_accum).backward()


def optimizer_step(job, engine, opt, params: list) -> None:
    if engine is None:
        torch.nn.utils.clip_grad_norm_(params, job.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)


def mean_over_workers(values: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    vec = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(vec)
    return dict(zip(values, (vec / dist.get_world_size()).tolist()))


def sum_over_workers(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    vec = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(vec)
    return vec.tolist()


def log_step(progress: Path, rank: int, metrics: dict, resumed_from: int | None) -> None:
    """Rank files (pid and step: what a test that kills a worker reads) and rank 0's metrics."""
    (progress / f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), "step": metrics["step"],
                                                           "resumed_from": resumed_from}))
    if rank == 0:
        with open(progress / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")


def save_and_report(job, metrics: dict, step: int, total: int, resumed_from: int | None, model, forward_model,
                    opt, rank: int, export=None) -> None:
    """Checkpoint (resume state; at the last step also `export(folder)`, the exported model) and
    report it.  With DeepSpeed every rank writes its own ZeRO shards into the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    final = step == total
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if job.strategy == "deepspeed":
            forward_model.save_checkpoint(str(d / "deepspeed"))  # tag global_stepN; the "latest" file names it
        if rank == 0:
            (d / "trainer_state.json").write_text(json.dumps({"step": step, "total": total,
                                                              "resumed_from": resumed_from}))
            if job.strategy != "deepspeed":
                torch.save(model.state_dict(), d / "model_state.pt")
                torch.save(opt.state_dict(), d / "optimizer.pt")
        if final and export is not None:
            with gathered(job, model):
                if rank == 0:
                    export(d / "model")
        keep = rank == 0 or job.strategy == "deepspeed"
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if keep else None)


@contextlib.contextmanager
def gathered(job, model):
    """Full parameters inside the block (ZeRO-3 partitions them across ranks; every rank enters)."""
    if job.strategy == "deepspeed" and job.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
    else:
        yield
