"""Where a vLLM engine runs: the GPU checks, the Ray environment of a tensor-parallel engine,
and the Ray actor options that place it (see `vpref.actors.vllm_backend` for how it fits).

Nothing here imports vLLM at module level; `import_vllm` does, with an error that says what to
install."""

from __future__ import annotations

import os
from collections.abc import Mapping


# --------------------------------------------------------------------------- environment


def import_vllm():
    """The vllm module, or an ImportError that says what to install and where."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "the vllm backend needs vLLM (0.30-0.33), which is not installed here: on a GPU machine run "
            "`pip install 'vpref[gpu]'` (vLLM pins its own torch/transformers; use a separate environment "
            f"from the CPU one), or use backend: hf.  ({e})"
        ) from e
    return vllm


def check_gpus(tp: int, visible_gpus: int, placement_group_gpus: float | None) -> None:
    """Raise a clear RuntimeError when this engine cannot get the GPUs it needs.

    `visible_gpus`: CUDA devices this process sees.  `placement_group_gpus`: GPUs in the Ray
    placement group this process was scheduled into (None: not in one)."""
    if placement_group_gpus is not None and tp > 1:
        if placement_group_gpus < tp:
            raise RuntimeError(
                f"tensor_parallel_size={tp} needs {tp} GPU bundles in the actor's placement group, it has "
                f"{placement_group_gpus:g} GPUs; create the actor with vllm_actor_options(member)")
        return
    if visible_gpus == 0:
        raise RuntimeError(
            "the vllm backend needs a CUDA GPU and this process sees none "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run it on a GPU node, give the "
            "Ray actor a GPU (vllm_actor_options(member)), or use backend: hf on CPU")
    if visible_gpus < tp and placement_group_gpus is None:
        try:
            import ray

            if ray.is_initialized():  # vLLM's Ray executor will ask the cluster for the GPUs
                return
        except ImportError:
            pass
        raise RuntimeError(f"tensor_parallel_size={tp} needs {tp} GPUs; this process sees {visible_gpus}")


def _current_placement_group():
    try:
        import ray
        from ray.util import get_current_placement_group
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return get_current_placement_group()


def require_gpus(tp: int) -> None:
    import torch

    pg = _current_placement_group()
    pg_gpus = sum(b.get("GPU", 0) for b in pg.bundle_specs) if pg is not None else None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_gpus(tp, visible, pg_gpus)


def tp_env_changes(tp: int, placement_group_bundles: int | None, gcs_address: str | None,
                   env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Environment for a tensor-parallel engine inside a Ray actor: (variables to set, to remove).

    The engine-core subprocess must join this Ray cluster (RAY_ADDRESS), and with a placement
    group the Ray executor must use bundles 0..tp-1 while the num_gpus=0 actor's empty
    CUDA_VISIBLE_DEVICES must not leak into the workers."""
    if tp <= 1:
        return {}, []
    set_vars: dict[str, str] = {}
    unset: list[str] = []
    if gcs_address and not env.get("RAY_ADDRESS"):
        set_vars["RAY_ADDRESS"] = gcs_address
    if placement_group_bundles is not None:
        if placement_group_bundles < tp:
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} placement group bundles, "
                             f"the actor's group has {placement_group_bundles}")
        if not env.get("VLLM_RAY_BUNDLE_INDICES"):
            set_vars["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(i) for i in range(tp))
        unset += [k for k in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES") if k in env]
    return set_vars, unset


def prepare_ray_env(tp: int) -> dict[str, str]:
    """Apply `tp_env_changes` to this process (call before the engine is built)."""
    gcs = None
    try:
        import ray

        if ray.is_initialized():
            gcs = ray.get_runtime_context().gcs_address
    except ImportError:
        pass
    pg = _current_placement_group()
    set_vars, unset = tp_env_changes(tp, len(pg.bundle_specs) if pg is not None else None, gcs, os.environ)
    for k in unset:
        os.environ.pop(k, None)
    os.environ.update(set_vars)
    return set_vars


# --------------------------------------------------------------------------- Ray hosting


def tp_bundles(tp: int, num_cpus: float, custom: Mapping[str, float] | None = None) -> list[dict[str, float]]:
    """Placement-group bundles of a tensor-parallel engine: one GPU each; the actor's CPUs and
    custom resources in bundle 0 (where the actor itself is scheduled)."""
    first = {"GPU": 1.0, **({"CPU": float(num_cpus)} if num_cpus else {}), **dict(custom or {})}
    return [first] + [{"GPU": 1.0} for _ in range(tp - 1)]


def vllm_actor_options(member, resources=None, label_selector: dict | None = None) -> dict:
    """Ray actor options for an actor hosting a vLLM engine (a GeneratorActor with backend vllm,
    or a judge with judge.backend vllm).

    `member`: a ZooMember (its `vllm` and `resources` are used) or anything with `.vllm`; pass
    `resources` (a ResourcesConfig) for a JudgeConfig (`cfg.pool.resources`).  Merge the result
    with the name/namespace/restart options: `RemoteGenerator.options(name=..., **opts)`.

    TP == 1: the actor takes the GPU (num_gpus from resources, at least a share of one).
    TP > 1: a STRICT_PACK placement group of TP one-GPU bundles is created here; the actor takes
    num_gpus=0 and bundle 0, capturing child tasks so vLLM's workers land in the group.  The
    group lives as long as the job; remove it (`ray.util.remove_placement_group(
    opts["scheduling_strategy"].placement_group)`) when the actor is retired for good.
    `label_selector` (vpref.actors.placement) goes on every bundle of that group."""
    r = resources if resources is not None else member.resources
    tp = member.vllm.tensor_parallel_size
    custom = dict(r.custom) or None
    if tp == 1:
        return {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus if r.num_gpus > 0 else 1, "resources": custom}
    from ray.util import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from vpref.actors.placement import bundle_selectors

    pg = placement_group(tp_bundles(tp, r.num_cpus, custom), strategy="STRICT_PACK",
                         bundle_label_selector=bundle_selectors(label_selector, tp))
    return {
        "num_cpus": r.num_cpus,
        "num_gpus": 0,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
    }
