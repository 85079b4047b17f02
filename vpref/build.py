"""The data engine: (video, question) -> zoo answers -> judgments -> chosen/rejected pairs.

    decode each video once (Ray task) ──frames by ObjectRef──► GeneratorActor × zoo
    GeneratorActor: generate -> PairWriter (persist) -> bounded Queue (blocks when full)
    JudgePool: JudgeActor × [min..max] pull batches -> score -> PairWriter -> pairs (Parquet)

`DataEngine` owns the long-lived actors (generators keep their models across rounds and are
reloaded in place; judges keep theirs); `DataEngine.build` sets one build up in a folder (its
lock, its inputs, its plan, what is on disk and which failures to try again) and runs the driver
loop (`vpref.driver.drive`), which only dispatches work, watches the queue and the judges, and
re-enqueues work whose result was lost.  Re-running a build skips what is on disk.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path

import ray

from vpref.actors.decode import DecoderPool
from vpref.actors.generator import GeneratorActor
from vpref.actors.metrics import driver_metrics, publish_status
from vpref.actors.queue import BatchQueue
from vpref.actors.placement import configure as use_placement, main_options, main_selector
from vpref.actors.pool import JudgePool, placement_group_of, release_group
from vpref.actors.writer import PairWriter, write_plan
from vpref.cluster import prewarmed
from vpref.config import Config, JudgeConfig, ZooMember
from vpref.data.manifest import Sample
from vpref.data.schema import response_id
from vpref.errors import InputError, WorkFailed
from vpref.folders import FolderLock, check_build_inputs, checkpoint_identity, digest, questions_digest
from vpref.driver import BuildResult, drive, error_text
from vpref.health import actor_placed, patience, placeable_now, request_of, unplaceable
from vpref.judges.registry import judge_identity
from vpref.utils import log, progress

RemoteGenerator = ray.remote(GeneratorActor)
RemoteWriter = ray.remote(PairWriter)


class DataEngine:
    def __init__(self, cfg: Config, state_dir: str | Path, members: list[str] | None = None):
        """`members`: host only these zoo members (e.g. just the policy for evaluation)."""
        self.cfg = cfg
        ns = cfg.ray.namespace
        use_placement(cfg.ray)  # label selectors: keep judge nodes for judges
        self.state_dir = Path(state_dir)
        self.generators: dict[str, list] = {}
        self.groups: list = []  # placement groups of tensor-parallel generators
        self.requests: dict[str, dict] = {}  # actor name -> the resources it asks for
        self._ready = False
        for m in cfg.zoo:
            if members is not None and m.name not in members:
                continue
            replicas = []
            for i in range(m.replicas):
                name = f"gen-{m.name}-{i}"
                r = m.resources
                if m.backend == "vllm":  # GPUs through a placement group when tensor parallel
                    from vpref.actors.vllm_backend import vllm_actor_options

                    res = vllm_actor_options(m, label_selector=main_selector())
                    self.groups.append(placement_group_of(res))
                else:
                    res = dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=dict(r.custom) or None)
                replicas.append(RemoteGenerator.options(
                    name=name, namespace=ns, max_restarts=-1, max_task_retries=-1, **res, **main_options(res),
                ).remote(m.model_dump(), name, str(self.state_dir / "actors" / f"{name}.json")))
                self.requests[name] = request_of(res)
            self.generators[m.name] = replicas
        self.pool = JudgePool(cfg.judge, ns)
        self.decoders = DecoderPool(cfg.data, cfg.data.decoders, ns)
        # Queues and writer live as long as the engine (a build does not wait for processes to start).
        opts = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1, "namespace": ns, **main_options()}
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

    def judge_items(self, items: list[dict], what: str = "evaluation") -> list:
        """Score response items outside a build (evaluation): the reference judge runs right here;
        an LLM judge runs on a pool judge (its model is already loaded there).  A judge that fails
        gives failure records; more than build.max_judge_failure_rate of them stops the command."""
        from vpref.actors.judge import judge_items, make_judge

        if self.cfg.judge.kind == "reference":
            out = judge_items(make_judge(self.cfg.judge, actor="driver"), items)[0]
        else:
            if not self.pool.actors:
                self.pool._spawn()
            name = sorted(self.pool.actors)[0]
            out = ray.get(self.pool.actors[name].score_items.remote(items))
        failed = [j for j in out if not j.ok]
        b = self.cfg.build
        if out and len(failed) / len(out) > b.max_judge_failure_rate:
            errs = "; ".join(sorted({j.error or "?" for j in failed})[:2])
            j = self.cfg.judge
            raise WorkFailed(f"{what}: {len(failed)} of {len(out)} judgments failed (> build.max_judge_failure_rate "
                             f"{b.max_judge_failure_rate:.0%}): {errs}. Check the judge (judge.kind={j.kind}"
                             f"{', judge.model=' + str(j.model) if j.model else ''}), then run the same command again")
        return out

    def wait_ready(self) -> None:
        """Wait until every generator has loaded its model.  A member that fails to start stops the
        command naming it and the cause; one that no node can place (or that stays unplaced while
        the cluster lacks what it asks) stops it after ray.placement_timeout_s."""
        if self._ready:
            return
        names = {a.info.remote(): (m, f"gen-{m}-{i}", a) for m, reps in self.generators.items()
                 for i, a in enumerate(reps)}
        index = {m.name: i for i, m in enumerate(self.cfg.zoo)}
        t0, pending = time.monotonic(), list(names)
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
            for ref in ready:
                member, actor, _ = names[ref]
                try:
                    ray.get(ref)
                except Exception as e:
                    raise WorkFailed(f"zoo member {member!r} ({actor}) could not start: {error_text(e)}. Check "
                                     f"zoo.{index[member]}.path (a Hugging Face checkpoint folder; `vpref sft` writes "
                                     f"the demo's) and its dtype and resources") from None
            waited = time.monotonic() - t0
            for ref in pending:  # placed ones are loading their model: they may take their time
                member, actor, handle = names[ref]
                req = self.requests.get(actor, {})
                if waited > patience(self.cfg, req):
                    placed = actor_placed(handle)
                    if placed is False or (placed is None and not placeable_now(req)):
                        raise unplaceable(f"generator {actor}", req, waited,
                                          f"Lower zoo.{index[member]}.resources, or add nodes that have it")
        self._ready = True

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

    @prewarmed  # ray.prewarm_judges: judge nodes requested for the build, released after it
    def build(self, samples: list[Sample], out_dir: str | Path, round_: int = 0, policy_version: int = 0,
              progress_every_s: float = 5.0) -> BuildResult:
        """One build into `out_dir`, locked while it runs.  Resumes what is on disk (and tries failed
        items again, up to build.max_attempts); refuses a folder holding a build of other inputs;
        raises WorkFailed past the failure budget or when the work stalls."""
        out = Path(out_dir)
        with FolderLock(out, "build", key="build.out"):
            return self._build(samples, out, round_, policy_version, progress_every_s)

    def build_inputs(self, samples: list[Sample], round_: int, policy_version: int) -> dict[str, str]:
        """Digests of what a build is made from (recorded in build.json; another build's folder is refused)."""
        cfg = self.cfg
        keep = {"name", "path", "backend", "policy", "role", "sampling", "batch_size", "dtype"}
        zoo = [{**m.model_dump(include=keep), "checkpoint": checkpoint_identity(m.path)} for m in self.members]
        judge = cfg.judge.model_dump(exclude={"pool", "vllm", "api_concurrency", "api_timeout_s", "api_retries",
                                              "api_key_env", "api_base"})
        return {"questions": questions_digest((s.id, s.video, s.question, s.answer, s.family) for s in samples),
                "zoo": digest(zoo), "judge": digest([judge_identity(cfg), judge]),
                "pairs": digest(cfg.pairs.model_dump()), "round": digest([round_, policy_version])}

    def _build(self, samples: list[Sample], out: Path, round_: int, policy_version: int,
               progress_every_s: float) -> BuildResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        judge, rubric, rubric_version = judge_identity(cfg)
        members = self.members
        if not members:
            raise InputError("the zoo has no generator members: set `role: generator` on at least one zoo entry")
        inputs = self.build_inputs(samples, round_, policy_version)
        check_build_inputs(out, inputs, "choose another folder (build.out), or start it afresh with "
                                        "`vpref build-data --fresh` (deletes that build)")
        self.wait_ready()
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
             "zoo": [m.model_dump() for m in members], "pairs": cfg.pairs.model_dump(), "samples": len(samples),
             "inputs": inputs}, indent=2))
        queue, pair_queue, writer = self.queue, self.pair_queue, self.writer
        for q in (queue, pair_queue):  # leftovers of an earlier build (re-enqueued duplicates)
            while q is not None and q.get_batch(1024, timeout=0):
                pass
        write_plan(out, plan)
        done_ids = set(ray.get(writer.open.remote(str(out), cfg.pairs.model_dump())))  # what is on disk
        retried = ray.get(writer.retry_failures.remote(cfg.build.max_attempts))
        if retried["responses"] or retried["judgments"] or retried["verdicts"]:
            log(f"build: trying again {retried['responses']} failed generations, {retried['judgments']} failed "
                f"judgments, {retried['verdicts']} failed verdicts (build.max_attempts={cfg.build.max_attempts})")
        if retried["exhausted"]:
            log(f"build: {retried['exhausted']} items failed build.max_attempts={cfg.build.max_attempts} times; "
                f"their failure records stay (not tried again)")
        done_ids -= set(retried["response_ids"])

        # Work: batches of each member in sample order; a batch whose responses are all on disk is done.
        # A batch only partly on disk (its failed items are tried again) sends just those, one by one.
        todo: dict[str, deque] = {}
        for m in members:
            batches = deque()
            for b, start in enumerate(range(0, len(samples), m.batch_size)):
                chunk = samples[start:start + m.batch_size]
                need = [s for s in chunk
                        if not {response_id(round_, s.id, m.name, k) for k in range(m.sampling.n)} <= done_ids]
                if len(need) == len(chunk):
                    batches.append((start, b, chunk, None))  # with the batch's seed: a resumed build says the same
                else:
                    batches.extend((start, b, [s], s.id) for s in need)
            todo[m.name] = batches
        self.pool.attach(queue, pair_queue, writer)
        try:
            return drive(self, samples, out, round_, todo, by_id, t0, progress_every_s)
        finally:
            self.pool.detach()

    def with_captions(self, samples: list[Sample], out: Path) -> list[Sample]:
        from vpref.judges.captions import caption_samples  # the captioner (VLM-RLAIF's context), once per video

        return caption_samples(self, samples, out)

    def _progress(self, status: dict, depth: int, counts: dict, elapsed: float) -> None:
        rate = status["judged"] / elapsed if elapsed > 0 else 0.0
        self.metrics["responses_per_s"].set(status["responses"] / elapsed if elapsed > 0 else 0.0)
        self.metrics["judgments_per_s"].set(rate)
        publish_status(self.metrics, status)
        self.metrics["judges"].set(counts["alive"], tags={"state": "alive"})
        self.metrics["judges"].set(counts["pending"], tags={"state": "pending"})
        pending = f" (+{counts['pending']} pending)" if counts["pending"] else ""
        progress("build",
                 f"build: generated {status['responses']}/{status['expected_responses']} | judged {status['judged']} "
            f"({status['judge_failures']} failed) | pairs {status['pairs']} | questions "
            f"{status['samples_finished']}/{status['samples']} | queue {depth} | judges {counts['alive']}{pending} "
            f"| {elapsed:.0f}s")
