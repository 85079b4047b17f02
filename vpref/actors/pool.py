"""JudgePool: an elastic set of JudgeActors between `min` and `max`.

Judges pull from the shared queue, so the pool needs no routing: it only decides how many
judges there are.  It adds one when the queue backs up (depth >= scale_up_depth) and removes
an idle one (idle >= idle_s, queue empty) down to `min`.  A judge that cannot be placed yet
stays pending -- that unmet demand is what makes a cluster autoscaler add a judge node -- and
starts pulling as soon as it is placed.  One pending judge at a time: it is the signal, more
would only queue behind it.
"""

from __future__ import annotations

import time

import ray

from vpref.actors.judge import JudgeActor
from vpref.actors.placement import judge_options, judge_selector
from vpref.config import JudgeConfig

RemoteJudge = ray.remote(JudgeActor)


def judge_actor_options(cfg: JudgeConfig, name: str, namespace: str | None) -> dict:
    r = cfg.pool.resources
    if cfg.kind == "llm" and cfg.backend == "vllm":  # GPUs through a placement group when tensor parallel
        from vpref.actors.vllm_backend import vllm_actor_options

        res = vllm_actor_options(cfg, r, label_selector=judge_selector())
    else:
        res = dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=dict(r.custom) or None)
    return dict(name=name, namespace=namespace, max_restarts=-1, max_task_retries=-1, max_concurrency=4,
                get_if_exists=False, **res, **judge_options(res))


class JudgePool:
    def __init__(self, cfg: JudgeConfig, namespace: str | None = None, poll_s: float = 0.1):
        self.cfg = cfg
        self.namespace = namespace
        # how long an idle judge waits on the queue per call: short, so that the end of a build
        # (detach) does not wait for judges blocked on an empty queue
        self.poll_s = poll_s
        self.actors: dict[str, ray.actor.ActorHandle] = {}
        self.ready_refs: dict[str, ray.ObjectRef] = {}
        self.runs: dict[str, ray.ObjectRef] = {}
        self.wiring = None
        self.events: list[tuple[float, str, str]] = []  # (time, "up"|"down", judge name)
        self.groups: dict[str, object] = {}  # placement groups of multi-GPU (tensor parallel) judges
        self._next = 0
        self._last_change = 0.0
        self._empty_since: float | None = None  # when the queue last became empty
        while len(self.actors) < cfg.pool.min:
            self._spawn()

    # ------------------------------------------------------------------ membership

    def _spawn(self) -> str:
        name = f"judge-{self._next}"
        self._next += 1
        opts = judge_actor_options(self.cfg, name, self.namespace)
        actor = RemoteJudge.options(**opts).remote(self.cfg.model_dump(), name)
        self.actors[name] = actor
        self.groups[name] = placement_group_of(opts)
        self.ready_refs[name] = actor.ready.remote()
        if self.wiring is not None:
            self._start(name)
        return name

    def _start(self, name: str) -> None:
        queue, pair_queue, writer = self.wiring
        self.runs[name] = self.actors[name].run.remote(queue, pair_queue, writer, self.cfg.pool.batch_size,
                                                       self.poll_s)

    def placed(self) -> dict[str, bool]:
        refs = list(self.ready_refs.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        ready = set(ready)
        return {n: r in ready for n, r in self.ready_refs.items()}

    def retire(self, name: str, timeout_s: float = 30.0) -> None:
        actor = self.actors.pop(name)
        ref = self.ready_refs.pop(name)
        run = self.runs.pop(name, None)
        if ray.wait([ref], timeout=0)[0]:
            actor.stop.remote()
            if run is not None:
                ray.wait([run], timeout=timeout_s)  # let it finish the batch in hand
        ray.kill(actor, no_restart=True)
        release_group(self.groups.pop(name, None))

    # ------------------------------------------------------------------ a build's wiring

    def attach(self, queue, pair_queue, writer) -> None:
        """Point every judge's pull loop at this build's queue and writer."""
        self.wiring = (queue, pair_queue, writer)
        for name in self.actors:
            self._start(name)

    def detach(self, timeout_s: float = 60.0) -> None:
        """End the pull loops (judges keep their models for the next build), drop pending judges
        and shrink to `min`."""
        for name, ok in self.placed().items():
            if not ok:
                self.retire(name)
        for name in sorted(self.actors, key=_index)[self.cfg.pool.min:]:
            self.retire(name, timeout_s)
        for actor in self.actors.values():
            actor.stop.remote()
        runs = [self.runs.pop(n) for n in list(self.runs)]
        if runs:
            ray.wait(runs, num_returns=len(runs), timeout=timeout_s)
        self.wiring = None

    def shutdown(self) -> None:
        for name in list(self.actors):
            ray.kill(self.actors.pop(name), no_restart=True)
            release_group(self.groups.pop(name, None))
        self.ready_refs.clear()
        self.runs.clear()

    # ------------------------------------------------------------------ scaling

    def stats(self) -> list[dict]:
        placed = [n for n, ok in self.placed().items() if ok]
        refs = [self.actors[n].stats.remote() for n in placed]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0) if refs else ([], [])
        return [ray.get(r) for r in refs if r in done]

    def step(self, depth: int, stats: list[dict] | None = None) -> str | None:
        """One scaling decision from the queue depth; returns 'up', 'down' or None."""
        now = time.monotonic()
        if depth > 0:
            self._empty_since = None
        elif self._empty_since is None:
            self._empty_since = now
        if now - self._last_change < self.cfg.pool.interval_s:
            return None
        placed = self.placed()
        backed_up = depth >= self.cfg.pool.scale_up_depth or (depth > 0 and not self.actors)
        if backed_up and len(self.actors) < self.cfg.pool.max and all(placed.values()):
            name = self._spawn()
            self._last_change = now
            self.events.append((time.time(), "up", name))
            return "up"
        if depth == 0 and len(self.actors) > self.cfg.pool.min:
            # A pending judge is the autoscaler's demand for a node: keep it through a queue that
            # empties only for a moment between bursts, drop it once the queue stays empty.
            patient = now - self._empty_since < self.cfg.pool.idle_s
            pending = [] if patient else [n for n, ok in placed.items() if not ok]
            stats = stats if stats is not None else self.stats()
            idle = sorted((s["name"] for s in stats if not s["busy"] and s["idle_s"] >= self.cfg.pool.idle_s),
                          key=_index)
            victims = pending or idle
            if victims:
                self.retire(victims[-1])  # the newest first
                self._last_change = now
                self.events.append((time.time(), "down", victims[-1]))
                return "down"
        return None

    def counts(self) -> dict:
        placed = self.placed()
        return {"alive": sum(placed.values()), "pending": sum(not v for v in placed.values())}


def placement_group_of(options: dict):
    """The placement group an actor was scheduled into (tensor-parallel vLLM engines), if any."""
    strategy = options.get("scheduling_strategy")
    return getattr(strategy, "placement_group", None)


def release_group(pg) -> None:
    """Give a retired actor's GPUs back: a placement group outlives its actor otherwise."""
    if pg is not None:
        from ray.util import remove_placement_group

        remove_placement_group(pg)


def _index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])
