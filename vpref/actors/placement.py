"""Where vpref's work may run: Ray label selectors for the two pools of a cluster.

A cluster is split by one node label (`ray.pool_label`, default `vpref/pool`; KubeRay group
`labels`, `ray start --labels` on Slurm).  Nodes labelled `judge` (`ray.judge_pool`) are kept for
judges: everything else (generators, decoders, queues, the writer, reference log-prob tasks and
the Ray Train workers) asks for `{pool_label: "!judge"}`, which any node *without* that label
value satisfies, so an unlabelled single-node cluster runs everything unchanged.  Judges keep
asking for their custom resource (`judge.pool.resources.custom`) and, with
`ray.judges_select_pool`, also for `{pool_label: judge}`.

Why labels and not only the `judge` resource: a plain `{GPU: 1}` actor fits a judge node too, so
generator or training work that overflows its own group made the autoscaler start judge nodes for
it (and on Slurm took the judge node's GPUs).  Label selectors need autoscaler v2 to scale on
them (v1 would start a judge node anyway and leave it unusable).

The policy is cluster-wide, like the Ray connection itself: `configure(cfg.ray)` is called where
vpref joins a cluster (`vpref.cluster.init_ray`) and when a DataEngine starts; call sites add
`**main_options(opts)` / `**judge_options(opts)` to the options they already build.
"""

from __future__ import annotations

from vpref.config import RayConfig

_cfg = RayConfig()


def configure(cfg: RayConfig) -> None:
    """Use `cfg`'s labels from now on (in this driver process)."""
    global _cfg
    _cfg = cfg


def main_selector() -> dict[str, str] | None:
    """Label selector of all non-judge work (None: labels are off)."""
    if not _cfg.pool_label:
        return None
    return {_cfg.pool_label: f"!{_cfg.judge_pool}"}


def judge_selector() -> dict[str, str] | None:
    """Label selector of judge actors (None unless `ray.judges_select_pool`)."""
    if not _cfg.pool_label or not _cfg.judges_select_pool:
        return None
    return {_cfg.pool_label: _cfg.judge_pool}


def _with(selector: dict | None, opts: dict | None) -> dict:
    """`{"label_selector": selector}`, unless the actor sits in a placement group (its bundles
    carry the selector then: `bundle_label_selector`) or there is no selector."""
    if selector is None or _in_group(opts or {}):
        return {}
    return {"label_selector": dict(selector)}


def main_options(opts: dict | None = None) -> dict:
    """Extra Ray options for generators, decoders, queues, the writer and tasks: `.options(**opts,
    **main_options(opts))`."""
    return _with(main_selector(), opts)


def judge_options(opts: dict | None = None) -> dict:
    return _with(judge_selector(), opts)


def bundle_selectors(selector: dict | None, n: int) -> list[dict] | None:
    """`bundle_label_selector` for a placement group of n bundles."""
    return [dict(selector) for _ in range(n)] if selector else None


def _in_group(opts: dict) -> bool:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return isinstance(opts.get("scheduling_strategy"), PlacementGroupSchedulingStrategy)
