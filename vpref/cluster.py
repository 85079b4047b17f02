"""Joining a Ray cluster: the job's cluster under `ray job submit`, else a fresh local one."""

from __future__ import annotations

import os

from vpref.config import RayConfig
from vpref.utils import log


def init_ray(cfg: RayConfig, temp_dir: str | None = None) -> str:
    """Connect once; returns a short description of where we run."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}}
    if address:  # launched by `ray job submit` (RAY_ADDRESS is set) or pointed at a cluster
        ray.init(address=address, namespace=cfg.namespace, runtime_env=env)
        where = f"cluster at {address}"
    else:  # never attach to someone else's cluster by accident
        ctx = ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                       dashboard_host="127.0.0.1", namespace=cfg.namespace, runtime_env=env, _temp_dir=temp_dir)
        where = "new local cluster" + (f", dashboard {ctx.dashboard_url}" if ctx.dashboard_url else "")
    log(f"ray: {where} ({ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs)")
    return where
