"""The data engine: (video, question) -> zoo answers -> judgments -> chosen/rejected pairs.

    decode each video once (Ray task) ──frames by ObjectRef──► GeneratorActor × zoo
    GeneratorActor: generate -> PairWriter (persist) -> bounded Queue (blocks when full)
    JudgePool: JudgeActor × [min..max] pull batches -> score -> PairWriter -> pairs (Parquet)

`DataEngine` owns the long-lived actors (generators keep their models across rounds and are
reloaded in place; judges keep theirs); `DataEngine.build` runs one build into a folder.  The
driver only dispatches work, watches the queue to scale the judge pool, and re-enqueues work
whose result was lost (a judge or the queue dying mid-batch).  Re-running a build skips what is
on disk.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray

from vpref.actors.decode import DecoderPool
from vpref.actors.generator import GeneratorActor, WorkBatch, WorkItem
from vpref.actors.metrics import driver_metrics
from vpref.actors.queue import BatchQueue
from vpref.actors.pool import JudgePool, placement_group_of, release_group
from vpref.actors.writer import PairWriter, write_plan
from vpref.config import Config, JudgeConfig, ZooMember
from vpref.data.manifest import Reject, Sample, append_rejects
from vpref.data.schema import Response, response_id
from vpref.judges.rubric import load_rubric
from vpref.utils import log

RemoteGenerator = ray.remote(GeneratorActor)
RemoteWriter = ray.remote(PairWriter)
IN_FLIGHT_PER_REPLICA = 2


def judge_identity(cfg) -> tuple[str, str, str]:
    """(judge name, rubric, rubric version) without loading the judge's model."""
    if cfg.judge.kind == "reference":
        from vpref.judges.reference import ReferenceJudge

        j = ReferenceJudge()
        return j.name, j.rubric, j.rubric_version
    if cfg.judge.kind == "reward_model":
        from vpref.judges.reward_model import identity

        return identity(cfg.judge.model)
    r = load_rubric(cfg.judge.rubric)
    return f"llm:{Path(cfg.judge.model).name}", r.name, r.version  # as LLMJudge names itself


def batch_seed(run_seed: int, round_: int, member: ZooMember, index: int) -> int:
    return zlib.crc32(f"{run_seed}:{round_}:{member.name}:{member.sampling.seed}:{index}".encode())


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


class DataEngine:
    def __init__(self, cfg: Config, state_dir: str | Path, members: list[str] | None = None):
        """`members`: host only these zoo members (e.g. just the policy for evaluation)."""
        self.cfg = cfg
        ns = cfg.ray.namespace
        self.state_dir = Path(state_dir)
        self.generators: dict[str, list] = {}
        self.groups: list = []  # placement groups of tensor-parallel generators
        for m in cfg.zoo:
            if members is not None and m.name not in members:
                continue
            replicas = []
            for i in range(m.replicas):
                name = f"gen-{m.name}-{i}"
                r = m.resources
                if m.backend == "vllm":  # GPUs through a placement group when tensor parallel
                    from vpref.actors.vllm_backend import vllm_actor_options

                    res = vllm_actor_options(m)
                    self.groups.append(placement_group_of(res))
                else:
                    res = dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=dict(r.custom) or None)
                replicas.append(RemoteGenerator.options(
                    name=name, namespace=ns, max_restarts=-1, max_task_retries=-1, **res,
                ).remote(m.model_dump(), name, str(self.state_dir / "actors" / f"{name}.json")))
            self.generators[m.name] = replicas
        self.pool = JudgePool(cfg.judge, ns)
        self.decoders = DecoderPool(cfg.data, cfg.data.decoders, ns)
        # Queues and writer live as long as the engine (a build does not wait for processes to start).
        opts = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1, "namespace": ns}
        self.queue = BatchQueue(maxsize=cfg.build.queue_size, actor_options={**opts, "name": "queue"})
        # pair jobs (both-order comparisons) exist only with the pairwise check
        self.pair_queue = (BatchQueue(actor_options={**opts, "name": "pair-queue"})
                           if cfg.judge.pairwise_check else None)
        self.writer = RemoteWriter.options(name="writer", **opts).remote(
            pair_queue=self.pair_queue, state_file=str(self.state_dir / "actors" / "writer.json"))
        self.metrics = driver_metrics()

    # ------------------------------------------------------------------ actors

    @property
    def members(self) -> list[ZooMember]:
        return [m for m in self.cfg.zoo if m.role == "generator" and m.name in self.generators]

    def policy_replicas(self) -> list:
        m = self.cfg.policy_member
        return self.generators[m.name] if m else []

    def reload_policy(self, checkpoint: str | Path, version: int) -> list[dict]:
        """Load new policy weights into every policy replica, in place and in parallel."""
        return ray.get([a.load_weights.remote(str(checkpoint), version) for a in self.policy_replicas()])

    def _sleepers(self) -> list:
        return [a for m in self.cfg.zoo if m.name in self.generators and m.backend == "vllm"
                and m.vllm.enable_sleep_mode for a in self.generators[m.name]]

    def sleep(self, level: int = 1) -> int:
        """Free the GPUs of sleep-enabled vLLM generators (training shares them); returns how many slept."""
        actors = self._sleepers()
        ray.get([a.sleep.remote(level) for a in actors])
        return len(actors)

    def wake_up(self) -> int:
        actors = self._sleepers()
        ray.get([a.wake_up.remote() for a in actors])
        return len(actors)

    def set_judge(self, judge: JudgeConfig) -> None:
        """Judge the next builds (and `judge_items`) with `judge`: a judge schedule switches from
        the teacher to a reward model and back.  The pool's judges are replaced; nothing else is."""
        if judge == self.cfg.judge:
            return
        if judge.pairwise_check != self.cfg.judge.pairwise_check:
            raise ValueError("a judge schedule cannot switch judge.pairwise_check between rounds")
        self.pool.shutdown()
        self.cfg = self.cfg.model_copy(update={"judge": judge})
        self.pool = JudgePool(judge, self.cfg.ray.namespace)

    def judge_items(self, items: list[dict]) -> list:
        """Score response items outside a build (evaluation): the reference judge runs right here;
        an LLM judge runs on a pool judge (its model is already loaded there)."""
        from vpref.actors.judge import judge_items, make_judge

        if self.cfg.judge.kind == "reference":
            return judge_items(make_judge(self.cfg.judge, actor="driver"), items)[0]
        if not self.pool.actors:
            self.pool._spawn()
        name = sorted(self.pool.actors)[0]
        return ray.get(self.pool.actors[name].score_items.remote(items))

    def wait_ready(self) -> None:
        ray.get([a.info.remote() for reps in self.generators.values() for a in reps])

    def shutdown(self) -> None:
        self.pool.shutdown()
        self.decoders.shutdown()
        for q in (self.queue, self.pair_queue):
            if q is not None:  # (a Queue's truth value is its length)
                ray.kill(q.actor, no_restart=True)
        ray.kill(self.writer, no_restart=True)
        for reps in self.generators.values():
            for a in reps:
                ray.kill(a, no_restart=True)
        for pg in self.groups:
            release_group(pg)

    # ------------------------------------------------------------------ one build

    def build(self, samples: list[Sample], out_dir: str | Path, round_: int = 0, policy_version: int = 0,
              progress_every_s: float = 5.0) -> BuildResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        judge, rubric, rubric_version = judge_identity(cfg)
        members = self.members
        if not members:
            raise ValueError("the zoo has no generator (role: generator) members")
        self.decoders.reset()
        samples = self.with_captions(samples, out)
        by_id = {s.id: s for s in samples}
        expected = {s.id: [response_id(round_, s.id, m.name, k) for m in members for k in range(m.sampling.n)]
                    for s in samples}
        plan = {
            "samples": {s.id: {"question": s.question, "answer": s.answer, "caption": s.caption,
                               "family": s.family, "video": s.video} for s in samples},
            "expected": expected, "round": round_, "policy_version": policy_version, "judge": judge,
            "rubric": rubric, "rubric_version": rubric_version, "pairwise": cfg.judge.pairwise_check,
        }
        (out / "build.json").write_text(json.dumps(
            {"round": round_, "policy_version": policy_version, "judge": judge, "rubric": rubric_version,
             "zoo": [m.model_dump() for m in members], "pairs": cfg.pairs.model_dump(), "samples": len(samples)},
            indent=2))
        queue, pair_queue, writer = self.queue, self.pair_queue, self.writer
        for q in (queue, pair_queue):  # leftovers of an earlier build (re-enqueued duplicates)
            while q is not None and q.get_batch(1024, timeout=0):
                pass
        write_plan(out, plan)
        done_ids = set(ray.get(writer.open.remote(str(out), cfg.pairs.model_dump())))  # what is on disk

        # Work: batches of each member in sample order; a batch whose responses are all on disk is done.
        todo: dict[str, deque] = {}
        for m in members:
            batches = deque()
            for b, start in enumerate(range(0, len(samples), m.batch_size)):
                chunk = samples[start:start + m.batch_size]
                ids = [response_id(round_, s.id, m.name, k) for s in chunk for k in range(m.sampling.n)]
                if not set(ids) <= done_ids:
                    batches.append((start, b, chunk))
            todo[m.name] = batches
        n_batches = sum(len(q) for q in todo.values())

        self.pool.attach(queue, pair_queue, writer)

        clip_refs: dict[str, ray.ObjectRef] = {}
        failed_videos: dict[str, str] = {}
        users: dict[str, int] = {}  # video -> batches still to use its frames
        for q in todo.values():
            for _, _, chunk in q:
                for s in chunk:
                    users[s.video] = users.get(s.video, 0) + 1
        in_flight: dict[ray.ObjectRef, tuple] = {}  # generate_batch ref -> (member, replica, batch)
        load = {(m.name, i): 0 for m in members for i in range(m.replicas)}
        rejects: list[Reject] = []
        lookahead = 4 * max(m.batch_size for m in members)
        timeline, last_log, idle_checks = [], 0.0, 0
        members_by_name = {m.name: m for m in members}

        def frontier() -> int:
            heads = [q[0][0] for q in todo.values() if q]
            return min(heads) if heads else len(samples)

        def ensure_decoded(upto: int) -> None:
            for s in samples[:upto]:
                if s.video not in clip_refs and s.video not in failed_videos and users.get(s.video):
                    clip_refs[s.video] = self.decoders.submit(s.video)

        def resolve(videos) -> bool:
            """True when every video is decoded or known bad; records decode failures."""
            for v in videos:
                if v not in clip_refs and v not in failed_videos:
                    clip_refs[v] = self.decoders.submit(v)
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

        def dispatch() -> None:
            limit = frontier() + lookahead  # members stay within a window, which bounds the frames held
            ensure_decoded(min(len(samples), limit))
            progressed = True
            while progressed:
                progressed = False
                order = sorted((q[0][0], name) for name, q in todo.items() if q and q[0][0] < limit)
                for _, name in order:
                    m = members_by_name[name]
                    free = [i for i in range(m.replicas) if load[(name, i)] < IN_FLIGHT_PER_REPLICA]
                    if not free:
                        continue
                    start, b, chunk = todo[name][0]
                    if not resolve({s.video for s in chunk}):
                        continue
                    todo[name].popleft()
                    good = drop_failed(chunk)
                    for s in chunk:
                        users[s.video] -= 1
                    if good:
                        items = [WorkItem(s.id, s.question, s.answer, s.caption, s.family, s.video, clip_refs[s.video])
                                 for s in good]
                        wb = WorkBatch(name, b, round_, batch_seed(cfg.run.seed, round_, m, b), items)
                        i = min(free, key=lambda k: load[(name, k)])
                        ref = self.generators[name][i].generate_batch.remote(wb, queue, writer)
                        in_flight[ref] = (name, i, wb)
                        load[(name, i)] += 1
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
                    except Exception as e:  # a generation that failed for good: record it, never lose the questions
                        self._record_generation_error(writer, wb, members_by_name[name], e)
            else:
                time.sleep(0.1)
            status = ray.get(writer.status.remote())
            depth = queue.size()
            self.metrics["queue_depth"].set(depth)
            stats = self.pool.stats()
            self.pool.step(depth, stats)
            counts = self.pool.counts()
            elapsed = time.perf_counter() - t0
            timeline.append((round(elapsed, 3), status["responses"], status["judged"], depth, counts["alive"]))
            if elapsed - last_log >= progress_every_s:
                last_log = elapsed
                self._progress(status, depth, counts, elapsed)
            generating = bool(in_flight) or any(todo.values())
            if not generating and status["complete"]:
                break
            # Everything generated, nothing queued, no judge busy, still incomplete: results were
            # lost (a judge or the queue died mid-batch).  Re-enqueue what is missing.
            quiet = (not generating and depth == 0 and (pair_queue is None or pair_queue.size() == 0)
                     and not any(s["busy"] for s in stats))
            idle_checks = idle_checks + 1 if quiet else 0
            if idle_checks >= 3:
                idle_checks = 0
                if dropped:  # a restarted writer forgot them (they are not on disk)
                    ray.get(writer.drop_samples.remote(dropped))
                lost = ray.get(writer.missing.remote())
                if lost:
                    log(f"build: re-enqueueing {len(lost)} responses whose judgments were lost")
                queue.put_batch(lost)

        self.pool.detach()
        status = ray.get(writer.finalize.remote())
        decodes = self.decoders.counts_since_start()
        n_rej = append_rejects(out / "rejects.jsonl", rejects)
        elapsed = time.perf_counter() - t0
        self._progress(status, 0, self.pool.counts(), elapsed)
        return BuildResult(str(out), status, decodes, elapsed, n_rej, list(self.pool.events), timeline)

    # ------------------------------------------------------------------ helpers

    def _record_generation_error(self, writer, wb: WorkBatch, member: ZooMember, err: Exception) -> None:
        msg = f"{type(err).__name__}: {str(err).splitlines()[-1][:300] if str(err) else ''}"
        log(f"build: generation batch {wb.index} of {member.name} failed for good ({msg}); recorded as errors")
        records = [Response(response_id(wb.round, it.sample_id, member.name, k), it.sample_id, wb.round, member.name,
                            member.path, member.policy, -1, k, "", 0, "error", member.sampling.temperature,
                            member.sampling.top_p, wb.seed, error=msg)
                   for it in wb.items for k in range(member.sampling.n)]
        ray.get(writer.add_responses.remote(records))

    def with_captions(self, samples: list[Sample], out: Path) -> list[Sample]:
        """Fill missing captions with the zoo's captioner (VLM-RLAIF's context), once per video."""
        need = sorted({s.video for s in samples if not s.caption})
        captioners = [m for m in self.cfg.zoo if m.role == "captioner"]
        if not need or not captioners:
            return samples
        from vpref.judges.rubric import caption_instruction

        cache_path = out / "captions.jsonl"
        cache = {}
        if cache_path.is_file():
            for line in cache_path.read_text().splitlines():
                row = json.loads(line)
                cache[row["video"]] = row["caption"]
        todo = [v for v in need if v not in cache]
        m = captioners[0]
        actors = self.generators[m.name]
        ok = []
        for v in todo:
            ref = self.decoders.submit(v)
            try:
                ray.get(ref)
                ok.append((v, ref))
            except Exception:
                pass  # the build's own decode step rejects it with the cause
        calls = []
        for i in range(0, len(ok), m.batch_size):
            chunk = ok[i:i + m.batch_size]
            actor = actors[(i // m.batch_size) % len(actors)]
            calls.append((chunk, actor.generate.remote([r for _, r in chunk], [caption_instruction()] * len(chunk))))
        with open(cache_path, "a") as f:
            for chunk, ref in calls:
                for (v, _), comps in zip(chunk, ray.get(ref)):
                    cache[v] = comps[0].text
                    f.write(json.dumps({"video": v, "caption": cache[v], "model": m.name}) + "\n")
        log(f"build: captioned {len(todo)} videos with {m.name}")
        return [s if s.caption or s.video not in cache else
                Sample(s.id, s.video, s.question, s.answer, cache[s.video], {**s.meta, "caption_by": m.name})
                for s in samples]

    def _progress(self, status: dict, depth: int, counts: dict, elapsed: float) -> None:
        rate = status["judged"] / elapsed if elapsed > 0 else 0.0
        self.metrics["responses_per_s"].set(status["responses"] / elapsed if elapsed > 0 else 0.0)
        self.metrics["judgments_per_s"].set(rate)
        self.metrics["judges"].set(counts["alive"], tags={"state": "alive"})
        self.metrics["judges"].set(counts["pending"], tags={"state": "pending"})
        pending = f" (+{counts['pending']} pending)" if counts["pending"] else ""
        log(f"build: generated {status['responses']}/{status['expected_responses']} | judged {status['judged']} "
            f"({status['judge_failures']} failed) | pairs {status['pairs']} | questions "
            f"{status['samples_finished']}/{status['samples']} | queue {depth} | judges {counts['alive']}{pending} "
            f"| {elapsed:.0f}s")
