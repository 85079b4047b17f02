"""One build's driver loop: dispatch generation to the zoo, watch the queue and the judges,
recover lost work, and stop -- with what failed and what to do -- when the failure budget is
exceeded or the work stalls.  `DataEngine.build` (vpref.build) sets a build up and calls `drive`.

    until every question is finished:
        dispatch batches (a window ahead of the slowest member; each video decoded once)
        a batch that fails is split, its questions tried one by one; one failing alone -> a failure record
        scale the judge pool from the queue depth
        stop on the failure budget, a judge loop that ended or keeps failing, no judge placeable, a stall
        re-enqueue what a judge or the queue lost
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray

from vpref.actors.generator import WorkBatch, WorkItem
from vpref.config import ZooMember
from vpref.data.manifest import Reject, Sample, append_rejects
from vpref.data.schema import Response, response_id
from vpref.errors import WorkFailed
from vpref.health import STUCK_ERRORS, Watchdog, actor_placed, check_budget, patience, request_of, unplaceable
from vpref.utils import log

IN_FLIGHT_PER_REPLICA = 2
GENERATION_RETRIES = 3  # Ray re-runs a batch whose actor died this often; then its questions are tried one by one


def batch_seed(run_seed: int, round_: int, member: ZooMember, index) -> int:
    return zlib.crc32(f"{run_seed}:{round_}:{member.name}:{member.sampling.seed}:{index}".encode())


def error_text(e: BaseException) -> str:
    """One line saying why a remote call failed: the remote exception itself, not Ray's wrapping."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        return error_text(cause)
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if isinstance(e, ray.exceptions.RayActorError):  # the creation task's error is the last line of its traceback
        last = next((ln for ln in reversed(lines) if "Error" in ln.split(":")[0]), lines[-1] if lines else "")
        return f"{type(e).__name__}: {last[:300]}"
    return f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"


@dataclass


class BuildResult:
    out_dir: str
    status: dict
    decodes: dict
    seconds: float
    rejects: int
    judge_events: list = field(default_factory=list)
    timeline: list = field(default_factory=list)  # (seconds, responses, judged, queue depth, judges alive)

    def summary(self) -> dict:
        return {"out_dir": self.out_dir, "seconds": round(self.seconds, 2), "rejects": self.rejects,
                "decodes": self.decodes, **self.status}


def drive(engine, samples, out: Path, round_: int, todo: dict, by_id: dict, t0: float,
          progress_every_s: float) -> BuildResult:
    """The driver loop: dispatch generation, watch the queue and the judges, recover lost work,
    stop on the failure budget or a stall."""
    cfg = engine.cfg
    queue, pair_queue, writer = engine.queue, engine.pair_queue, engine.writer
    members = engine.members
    clip_refs: dict[str, ray.ObjectRef] = {}
    failed_videos: dict[str, str] = {}
    users: dict[str, int] = {}  # video -> batches still to use its frames
    for q in todo.values():
        for _, _, chunk, _ in q:
            for s in chunk:
                users[s.video] = users.get(s.video, 0) + 1
    in_flight: dict[ray.ObjectRef, tuple] = {}  # generate_batch ref -> (member, replica, batch)
    retry: dict[str, deque] = {m.name: deque() for m in members}  # items of failed batches, to try one by one
    load = {(m.name, i): 0 for m in members for i in range(m.replicas)}
    rejects: list[Reject] = []
    lookahead = 4 * max(m.batch_size for m in members)
    timeline, last_log, idle_checks, last_budget = [], 0.0, 0, 0.0
    members_by_name = {m.name: m for m in members}
    watchdog = Watchdog(cfg.build.stall_timeout_s)
    no_judge_since: float | None = None

    def frontier() -> int:
        heads = [q[0][0] for q in todo.values() if q]
        return min(heads) if heads else len(samples)

    def ensure_decoded(upto: int) -> None:
        for s in samples[:upto]:
            if s.video not in clip_refs and s.video not in failed_videos and users.get(s.video):
                clip_refs[s.video] = engine.decoders.submit(s.video)

    def resolve(videos) -> bool:
        """True when every video is decoded or known bad; records decode failures."""
        for v in videos:
            if v not in clip_refs and v not in failed_videos:
                clip_refs[v] = engine.decoders.submit(v)
        refs = [clip_refs[v] for v in videos if v in clip_refs]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(ready) < len(refs):
            return False
        for v in videos:
            if v in clip_refs:
                try:
                    ray.get(clip_refs[v])
                except Exception as e:  # VideoDecodeError, wrapped by Ray
                    cause = getattr(e, "cause", None) or str(e).splitlines()[-1]
                    failed_videos[v] = cause
                    del clip_refs[v]
        return True

    dropped: dict[str, str] = {}  # question -> why it cannot be answered (its video did not decode)

    def drop_failed(chunk) -> list[Sample]:
        bad = {s.id: f"video {s.video} could not be decoded: {failed_videos[s.video]}"
               for s in chunk if s.video in failed_videos}
        if bad:
            new = [b for b in bad if b not in dropped]
            if new:
                ray.get(writer.drop_samples.remote({b: bad[b] for b in new}))
                rejects.extend(Reject("decode", 0, b, bad[b], by_id[b].to_row()) for b in new)
                dropped.update({b: bad[b] for b in new})
        return [s for s in chunk if s.id not in bad]

    def submit(name: str, free: list[int], wb: WorkBatch) -> None:
        i = min(free, key=lambda k: load[(name, k)])
        ref = (engine.generators[name][i].generate_batch.options(max_task_retries=GENERATION_RETRIES)
               .remote(wb, queue, writer))
        in_flight[ref] = (name, i, wb)
        load[(name, i)] += 1

    def free_replicas(m: ZooMember) -> list[int]:
        return [i for i in range(m.replicas) if load[(m.name, i)] < IN_FLIGHT_PER_REPLICA]

    def dispatch() -> None:
        for name, q in retry.items():  # items of a failed batch first: their frames are held already
            while q and free_replicas(members_by_name[name]):
                submit(name, free_replicas(members_by_name[name]), q.popleft())
        limit = frontier() + lookahead  # members stay within a window, which bounds the frames held
        ensure_decoded(min(len(samples), limit))
        progressed = True
        while progressed:
            progressed = False
            order = sorted((q[0][0], name) for name, q in todo.items() if q and q[0][0] < limit)
            for _, name in order:
                m = members_by_name[name]
                free = free_replicas(m)
                if not free:
                    continue
                start, b, chunk, item = todo[name][0]
                if not resolve({s.video for s in chunk}):
                    continue
                todo[name].popleft()
                good = drop_failed(chunk)
                for s in chunk:
                    users[s.video] -= 1
                if good:
                    items = [WorkItem(s.id, s.question, s.answer, s.caption, s.family, s.video, clip_refs[s.video])
                             for s in good]
                    seed = batch_seed(cfg.run.seed, round_, m, b if item is None else f"{b}:{item}")
                    submit(name, free, WorkBatch(name, b, round_, seed, items))
                for s in chunk:  # in-flight tasks hold their own references to the frames
                    if users[s.video] == 0:
                        clip_refs.pop(s.video, None)
                progressed = True

    dispatch()  # generation first, then what an earlier attempt persisted but never judged
    queue.put_batch(ray.get(writer.missing.remote()))
    while True:
        dispatch()
        refs = list(in_flight)
        if refs:
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.2)
            for ref in ready:
                name, i, wb = in_flight.pop(ref)
                load[(name, i)] -= 1
                try:
                    ray.get(ref)
                except Exception as e:
                    m = members_by_name[name]
                    if len(wb.items) > 1:  # one bad question must not cost its neighbours their answers
                        log(f"build: generation batch {wb.index} of {name} failed ({error_text(e)}); trying its "
                            f"{len(wb.items)} questions one by one")
                        retry[name].extend(
                            WorkBatch(name, wb.index, round_,
                                      batch_seed(cfg.run.seed, round_, m, f"{wb.index}:{it.sample_id}"), [it])
                            for it in wb.items)
                    else:  # a question that fails alone: a failure record with the reason, never lost
                        record_generation_error(writer, wb, m, e)
        else:
            time.sleep(0.1)
        status = ray.get(writer.status.remote())
        depth = queue.size()
        engine.metrics["queue_depth"].set(depth)
        stats = engine.pool.stats()
        engine.pool.step(depth, stats)
        counts = engine.pool.counts()
        elapsed = time.perf_counter() - t0
        timeline.append((round(elapsed, 3), status["responses"], status["judged"], depth, counts["alive"]))
        if elapsed - last_log >= progress_every_s:
            last_log = elapsed
            engine._progress(status, depth, counts, elapsed)
        generating = bool(in_flight) or any(todo.values()) or any(retry.values())
        if not generating and status["complete"]:
            break
        if elapsed - last_budget >= 2.0:  # stop early when most of the work fails
            last_budget = elapsed
            check_budget(f"build {out}", status, lambda: ray.get(writer.failure_summary.remote()), cfg.build,
                         cfg.judge, cfg.pairs, final=False)
        pair_depth = pair_queue.size() if pair_queue is not None else 0
        no_judge_since = check_judges(engine, stats, counts, depth + pair_depth, no_judge_since, out)
        stalled = watchdog.observe((status["responses"], status["judged"], status["verdicts"], status["pairs"],
                                    status["samples_finished"], len(in_flight), depth, pair_depth,
                                    sum(len(q) for q in todo.values()), sum(len(q) for q in retry.values())))
        if stalled:
            raise stall_error(engine, out, stalled, in_flight, depth + pair_depth, counts, stats)
        # Everything generated, nothing queued, no judge busy, still incomplete: results were
        # lost (a judge or the queue died mid-batch).  Re-enqueue what is missing.
        quiet = not generating and depth == 0 and pair_depth == 0 and not any(s["busy"] for s in stats)
        idle_checks = idle_checks + 1 if quiet else 0
        if idle_checks >= 3:
            idle_checks = 0
            if dropped:  # a restarted writer forgot them (they are not on disk)
                ray.get(writer.drop_samples.remote(dropped))
            lost = ray.get(writer.missing.remote())
            if lost:
                log(f"build: re-enqueueing {len(lost)} responses whose judgments were lost")
            queue.put_batch(lost)

    status = ray.get(writer.finalize.remote())
    decodes = engine.decoders.counts_since_start()
    n_rej = append_rejects(out / "rejects.jsonl", rejects)
    elapsed = time.perf_counter() - t0
    engine._progress(status, 0, engine.pool.counts(), elapsed)
    result = BuildResult(str(out), status, decodes, elapsed, n_rej, list(engine.pool.events), timeline)
    try:
        check_budget(f"build {out}", status, lambda: ray.get(writer.failure_summary.remote()), cfg.build, cfg.judge,
                     cfg.pairs, final=True)
    except WorkFailed as e:
        e.result = result  # what the finished build did, for a caller that reports it anyway
        raise
    return result


def check_judges(engine, stats: list[dict], counts: dict, waiting: int, no_judge_since, out: Path):
    """Work must never wait on judges that are not working: a pull loop that ended, judges that
    all keep failing, or none placed while items wait.  Returns when the wait for a judge began."""
    for name, ref in list(engine.pool.runs.items()):
        if ray.wait([ref], timeout=0)[0]:
            try:
                ray.get(ref)
                why = "it returned without being stopped"
            except Exception as e:
                why = error_text(e)
            raise WorkFailed(f"build {out}: the pull loop of {name} ended ({why}); what finished is kept: run the "
                             f"same command again to resume")
    stuck = [s for s in stats if s.get("errors_in_a_row", 0) >= STUCK_ERRORS]
    if stats and len(stuck) == len(stats) and waiting:
        errs = "; ".join(f"{s['name']}: {s['last_error']}" for s in stuck[:2])
        raise WorkFailed(f"build {out}: every judge keeps failing in its pull loop ({errs}); nothing can be "
                         f"judged. Fix that, then run the same command again: what finished is kept")
    loading = any(actor_placed(a) for a in engine.pool.actors.values()) if counts["alive"] == 0 else False
    if waiting and counts["alive"] == 0 and not loading:  # (a placed judge may still be loading its model)
        now = time.monotonic()
        no_judge_since = no_judge_since or now
        req = request_of({"num_cpus": engine.cfg.judge.pool.resources.num_cpus,
                          "num_gpus": engine.cfg.judge.pool.resources.num_gpus,
                          "resources": engine.cfg.judge.pool.resources.custom})
        if now - no_judge_since > patience(engine.cfg, req):
            raise unplaceable(f"build {out}: {waiting} items wait, but a judge", req,
                              now - no_judge_since, "Lower judge.pool.resources, or add nodes that have them")
        return no_judge_since
    return None


def stall_error(engine, out: Path, stalled: float, in_flight: dict, waiting: int, counts: dict,
                stats: list) -> WorkFailed:
    gens = sorted({f"{name} batch {wb.index}" for name, _, wb in in_flight.values()})[:4]
    errs = [f"{s['name']}: {s['last_error']}" for s in stats if s.get("last_error")][:2]
    return WorkFailed(
        f"build {out}: no progress for {stalled:.0f}s (build.stall_timeout_s={engine.cfg.build.stall_timeout_s:g}): "
        f"{len(in_flight)} generation batches in flight{' (' + ', '.join(gens) + ')' if gens else ''}, {waiting} "
        f"items queued, judges {counts['alive']} alive / {counts['pending']} pending"
        f"{'; judge errors: ' + '; '.join(errs) if errs else ''}. What finished is kept: run the same command "
        f"again to resume, or raise build.stall_timeout_s if the models are just slow")


def record_generation_error(writer, wb: WorkBatch, member: ZooMember, err: Exception) -> None:
    msg = error_text(err)
    log(f"build: {member.name} could not answer {wb.items[0].sample_id if len(wb.items) == 1 else wb.index} "
        f"({msg}); recorded as a failure (retried by the next run of this build)")
    records = [Response(response_id(wb.round, it.sample_id, member.name, k), it.sample_id, wb.round, member.name,
                        member.path, member.policy, -1, k, "", 0, "error", member.sampling.temperature,
                        member.sampling.top_p, wb.seed, error=msg)
               for it in wb.items for k in range(member.sampling.n)]
    ray.get(writer.add_responses.remote(records))
