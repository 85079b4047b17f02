"""Joining a Ray cluster (the job's cluster under `ray job submit`, else a fresh local one), the
label policy that keeps judge nodes for judges, and pre-warming judge nodes for a build."""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path

from vpref.actors import placement
from vpref.config import Config, RayConfig
from vpref.utils import log, log_dir, verbose


def init_ray(cfg: RayConfig, temp_dir: str | None = None) -> str:
    """Connect once; returns a short description of where we run.

    Unless `vpref.utils.verbose()`, actors' output and Ray's own INFO lines stay out of the
    terminal: they are in Ray's session logs, linked from the run folder (`logs/ray`)."""
    import ray

    placement.configure(cfg)
    if ray.is_initialized():
        return "already connected"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ValueError(f"RAY_ADDRESS={address} is the job API's address (for `ray job submit`); run vpref "
                         "through `ray job submit ... -- python -m vpref ...`, or unset RAY_ADDRESS / set "
                         "ray.address to the cluster's GCS address (host:6379) to join it directly")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}}
    quiet = {} if verbose() else {"log_to_driver": False, "logging_level": "WARNING"}
    if address:  # launched by `ray job submit` (RAY_ADDRESS is set) or pointed at a cluster
        ray.init(address=address, namespace=cfg.namespace, runtime_env=env, **quiet)
        where = f"cluster at {address}"
    else:  # never attach to someone else's cluster by accident
        ctx = ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                       dashboard_host="127.0.0.1", namespace=cfg.namespace, runtime_env=env, _temp_dir=temp_dir,
                       **quiet)
        where = "new local cluster" + (f", dashboard http://{ctx.dashboard_url}" if ctx.dashboard_url else "")
    _link_session_logs()
    res = ray.cluster_resources()
    log(f"ray: {where} ({res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs, {len(ray.nodes())} nodes)")
    return where


def _link_session_logs() -> None:
    """`<run folder>/logs/ray` -> this Ray session's log folder (actors, raylet, Ray Train)."""
    d = log_dir()
    if d is None:
        return
    import ray

    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    except AttributeError:  # not the driver of a node we can see (Ray client)
        return
    link = d / "ray"
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(session, target_is_directory=True)
    except OSError:
        pass  # a read-only or odd file system: the logs are still in Ray's session folder


_PLAIN = ("CPU", "GPU", "memory", "object_store_memory")


def describe(cfg: RayConfig, judge_resources: dict[str, float]) -> list[str]:
    """The connected cluster as vpref sees it: one line per node (pool, resources), then where
    judges and the other work can go (`vpref cluster`)."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    lines = [f"{len(nodes)} node(s); pools by label {cfg.pool_label!r}" if cfg.pool_label
             else f"{len(nodes)} node(s); label selectors off (ray.pool_label: null)"]
    judge_nodes, main_nodes = 0, 0
    for n in nodes:
        res, labels = n["Resources"], n.get("Labels", {})
        pool = labels.get(cfg.pool_label, "-") if cfg.pool_label else "-"
        custom = {k: v for k, v in res.items()
                  if k not in _PLAIN and not k.startswith(("node:", "accelerator_type"))}
        fits_judge = all(res.get(k, 0) >= v for k, v in judge_resources.items())
        is_judge_pool = bool(cfg.pool_label) and pool == cfg.judge_pool
        judge_nodes += fits_judge and (is_judge_pool or not cfg.judges_select_pool)
        main_nodes += not is_judge_pool and res.get("CPU", 0) > 0
        extra = (f" {custom}" if custom else "") + ("  [head]" if _is_head(n) else "")
        lines.append(f"  {n['NodeID'][:10]}  {n['NodeManagerAddress']:<15} pool {pool:<6} "
                     f"CPU {res.get('CPU', 0):g} GPU {res.get('GPU', 0):g}{extra}")
    lines.append(f"judges ({judge_resources}) fit on {judge_nodes} node(s) now"
                 + ("" if judge_nodes else ": they stay pending until an autoscaler adds a judge node, or start "
                    "nodes with the judge resource (cluster/README.md)"))
    lines.append(f"generators, decoders, queues, writer and DPO workers may use {main_nodes} node(s)"
                 + (f" (never pool {cfg.judge_pool!r})" if cfg.pool_label else ""))
    return lines


def _is_head(node: dict) -> bool:
    return any(k.startswith("node:__internal_head__") for k in node["Resources"])


# --------------------------------------------------------------------------- pre-warming judge nodes


def judge_bundle(cfg: Config) -> dict[str, float]:
    """The resources of one judge actor as an autoscaler bundle (a k-GPU engine: one k-GPU bundle)."""
    r = cfg.judge.pool.resources
    gpus = r.num_gpus
    if cfg.judge.kind == "llm" and cfg.judge.backend == "vllm":
        gpus = max(gpus, 1) if cfg.judge.vllm.tensor_parallel_size == 1 else cfg.judge.vllm.tensor_parallel_size
    bundle = {"CPU": r.num_cpus, **({"GPU": gpus} if gpus else {}), **r.custom}
    return {k: v for k, v in bundle.items() if v}


@contextmanager
def prewarm_judges(cfg: Config):
    """Ask the autoscaler for `ray.prewarm_judges` judge nodes now (request_resources), so judges
    do not wait for a node each; always released at the end.  One owner per cluster:
    request_resources is a cluster-wide, last-writer-wins request."""
    n = min(cfg.ray.prewarm_judges, cfg.judge.pool.max)
    if n <= 0:
        yield
        return
    from ray.autoscaler.sdk import request_resources

    bundle, selector = judge_bundle(cfg), placement.judge_selector()
    try:
        request_resources(bundles=[bundle] * n, bundle_label_selectors=[selector] * n if selector else None)
        log(f"cluster: asked the autoscaler for {n} judge node(s) ({bundle}) for this build")
        yield
    finally:
        request_resources(bundles=[])  # hand the nodes back to idle termination


def prewarmed(build):
    """Decorator for DataEngine.build: the build runs inside `prewarm_judges(engine.cfg)`."""

    @functools.wraps(build)
    def wrapper(engine, *args, **kwargs):
        with prewarm_judges(engine.cfg):
            return build(engine, *args, **kwargs)

    return wrapper
