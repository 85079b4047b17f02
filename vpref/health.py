"""Is the work going well?  The failure budget of a build, the progress watchdog, and resource
requests the cluster cannot place (what was asked, what the cluster has).

Each check raises `WorkFailed` (exit code 3) with a message that says what failed, what it was
waiting for, and what to do; what finished stays on disk, and re-running the same command
resumes (and retries what failed, see `PairWriter.retry_failures`).
"""

from __future__ import annotations

import time

from vpref.errors import WorkFailed

MIN_ITEMS = 32  # a failure rate is judged early only over at least this many items (at the end: over all)
STUCK_ERRORS = 3  # pull-loop errors in a row after which a judge counts as failing


# --------------------------------------------------------------------------- failure budget


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def budget_problems(status: dict, summary: dict | None, build_cfg, judge_cfg, pairs_cfg, final: bool) -> list[str]:
    """What exceeds the failure budget now (`final`: the build has finished; rates over everything)."""
    out = []
    judged, failed = status["judged"], status["judge_failures"]
    if judged and (final or judged >= MIN_ITEMS) and failed / judged > build_cfg.max_judge_failure_rate:
        errs = "; ".join((summary or {}).get("judge_errors", [])[:2])
        where = f" at {judge_cfg.api_base}" if judge_cfg.kind == "llm" and judge_cfg.backend == "openai" else ""
        out.append(f"{failed} of {judged} judgments failed ({_pct(failed / judged)} > build.max_judge_failure_rate "
                   f"{_pct(build_cfg.max_judge_failure_rate)}){': ' + errs if errs else ''}. Check the judge "
                   f"(judge.kind={judge_cfg.kind}{', judge.model=' + str(judge_cfg.model) if judge_cfg.model else ''}"
                   f"{where}), then run the same command again: failed judgments are retried (up to "
                   f"build.max_attempts={build_cfg.max_attempts} tries), finished ones are kept")
    for name, m in ((summary or {}).get("members") or {}).items():
        done = m["ok"] + m["failed"]
        errs = "; ".join(m["errors"][:2])
        if final and m["expected"] and m["ok"] == 0:
            out.append(f"zoo member {name!r} produced nothing: {m['failed']} of {m['expected']} generations failed"
                       f"{': ' + errs if errs else ''}. Check that member (its path, dtype and resources)")
        elif done and (final or done >= MIN_ITEMS) and m["failed"] / done > build_cfg.max_generation_failure_rate:
            out.append(f"zoo member {name!r}: {m['failed']} of {done} generations failed ({_pct(m['failed'] / done)} "
                       f"> build.max_generation_failure_rate {_pct(build_cfg.max_generation_failure_rate)})"
                       f"{': ' + errs if errs else ''}")
    if final and not out and status["samples"] and status["pairs"] == 0:
        out.append(f"no pairs: none of the {status['samples']} questions had two answers whose judge scores differ by "
                   f"pairs.min_margin={pairs_cfg.min_margin} or more. Lower pairs.min_margin, or sample more answers "
                   f"(zoo.<i>.sampling.n, more zoo members)")
    return out


def check_budget(where: str, status: dict, summary_fn, build_cfg, judge_cfg, pairs_cfg, final: bool) -> None:
    """Raise WorkFailed when the budget is exceeded; `summary_fn()` gives the writer's failure summary
    (asked for only when something failed, or at the end)."""
    suspicious = status["judge_failures"] or status["generation_errors"] or final
    summary = summary_fn() if suspicious else None
    probs = budget_problems(status, summary, build_cfg, judge_cfg, pairs_cfg, final)
    if probs:
        raise WorkFailed(f"{where} stopped {'at the end' if final else 'early'}: the failure budget is exceeded:\n  "
                         + "\n  ".join(probs) + f"\n  What finished is kept in {where}.")


# --------------------------------------------------------------------------- progress watchdog


class Watchdog:
    """Notices when nothing has moved for `stall_s` seconds (nothing generated, judged, paired, no
    queue movement): some work is then waited for that no one is doing."""

    def __init__(self, stall_s: float):
        self.stall_s = stall_s
        self.sig = None
        self.since = time.monotonic()

    def observe(self, signature) -> float | None:
        """Record the current progress signature; returns the seconds stalled once past the limit."""
        now = time.monotonic()
        if signature != self.sig:
            self.sig, self.since = signature, now
            return None
        stalled = now - self.since
        return stalled if stalled >= self.stall_s else None


# --------------------------------------------------------------------------- resources


def request_of(options: dict) -> dict[str, float]:
    """The resources an actor's Ray options ask for."""
    req = {"CPU": float(options.get("num_cpus") if options.get("num_cpus") is not None else 1.0)}
    if options.get("num_gpus"):
        req["GPU"] = float(options["num_gpus"])
    for k, v in (options.get("resources") or {}).items():
        req[k] = float(v)
    return {k: v for k, v in req.items() if v}


def describe(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items()) if not k.startswith(("node:", "memory",
                                                                                               "object_store"))) + "}"


def _fits(req: dict, have: dict) -> bool:
    return all(have.get(k, 0.0) + 1e-9 >= v for k, v in req.items())


def cluster_view() -> tuple[dict, dict, list[dict]]:
    """(total, available, per-node totals) of the connected Ray cluster."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return ray.cluster_resources(), ray.available_resources(), nodes


def actor_placed(handle) -> bool | None:
    """Whether Ray has given the actor a worker (it may still be loading its model); None when
    Ray's actor table cannot say.  Uses Ray's private GCS client: no dashboard is needed."""
    try:
        from ray._private import state

        info = state.actors(handle._actor_id.hex())
        return bool((info.get("Address") or {}).get("Port"))
    except Exception:
        return None


def fits_some_node(req: dict) -> bool:
    """Some node of the cluster has these resources in total (free or not)."""
    return any(_fits(req, n) for n in cluster_view()[2])


def patience(cfg, req: dict) -> float:
    """How long to wait for a request to be placed: ray.placement_timeout_s, but only a few seconds
    when no node can ever hold it on a local cluster vpref started (no autoscaler adds nodes there)."""
    from vpref.preflight import starts_local_cluster

    t = cfg.ray.placement_timeout_s
    return min(t, 5.0) if starts_local_cluster(cfg) and not fits_some_node(req) else t


def placeable_now(req: dict) -> bool:
    """Some node has the resources in total, and the cluster has them free now."""
    total, avail, nodes = cluster_view()
    return any(_fits(req, n) for n in nodes) and _fits(req, avail)


def unplaceable(what: str, req: dict, waited_s: float, fix: str) -> WorkFailed:
    total, avail, nodes = cluster_view()
    fit = any(_fits(req, n) for n in nodes)
    why = ("the cluster has that on some node, but not free: other actors hold it" if fit else
           "no node of the cluster has that much")
    return WorkFailed(f"{what} could not be placed within {waited_s:.0f}s (ray.placement_timeout_s): it asks for "
                      f"{describe(req)}; {why} (the cluster has {describe(total)} in all, {describe(avail)} free). "
                      f"{fix}")


def ensure_placeable(bundles: list[dict], timeout_s: float, what: str, fix: str, cfg=None) -> None:
    """Wait until `bundles` (a job's per-worker resources) could be placed together, then give
    them back; WorkFailed naming the request and the cluster after `timeout_s` (see `patience`
    when `cfg` is given).  A placement group that stays pending is also the demand a cluster
    autoscaler answers."""
    import ray
    from ray.util import placement_group, remove_placement_group

    bundles = [{k: v for k, v in b.items() if v} for b in bundles]
    if cfg is not None and any(not fits_some_node(b) for b in bundles):
        timeout_s = min(timeout_s, patience(cfg, bundles[0]))
    pg = placement_group(bundles, strategy="PACK")
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            total = {}
            for b in bundles:
                for k, v in b.items():
                    total[k] = total.get(k, 0.0) + v
            raise unplaceable(what, total, timeout_s, fix)
    finally:
        remove_placement_group(pg)
