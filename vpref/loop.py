"""The Iter-W2S-RLAIF driver (`vpref run`).

    theta_0 = ref_0 = SFT policy;  evaluate(theta_0)
    for t in 1..T:
        reload theta_{t-1} into the policy's generator actors        (in place, version t-1)
        judge_t   = teacher | RM trained on the teacher's judgments   (optional judge schedule, `distill`)
        pairs_t   = build_data(zoo, judge_t)                           (MMAIP-V)
        ref_t     = theta_{t-1} | theta_0 | a*theta_{t-1} + (1-a)*ref_{t-1}
        logp_ref  = reference_logps(ref_t, pairs_t)                    (once per round)
        theta_d   = DPO(init=theta_{t-1}, ref=logp_ref, pairs_t)       (Ray Train)
        theta_t   = theta_d + alpha*(theta_d - ref_t)                  (ExPO; alpha fixed or picked on dev)
        evaluate(theta_t)

Every stage writes into `run.out_dir/round_<t>/` and is recorded in `state.json` when it is
done; running again resumes at the first unfinished stage and redoes nothing finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from vpref.actors.judge import response_item
from vpref.build import DataEngine
from vpref.judges.registry import judge_identity
from vpref.cluster import init_ray
from vpref.config import Config
from vpref.data.card import write_card
from vpref.data.manifest import Sample, append_rejects, load_manifest
from vpref.eval.evaluator import Evaluator, evaluate_round, suite_runner
from vpref.eval.report import table, write_report
from vpref.eval.tables import round_summary, suite_tables
from vpref.errors import FolderConflict, InputError
from vpref.folders import FolderLock, checkpoint_identity, digest, file_digest
from vpref.health import ensure_placeable
from vpref.train.dpo import reference_logps, train_dpo
from vpref.train.expo import extrapolate, mix
from vpref.utils import log, progress, say

# The config keys (dotted prefixes) whose values a stage's results depend on.  A key no stage
# claims counts for every stage (a new key is assumed to matter); OPERATIONAL keys count for none.
STAGE_KEYS = {
    "eval": ("data", "eval", "judge", "zoo", "run.seed"),
    "data": ("data", "zoo", "judge", "pairs", "build", "loop.questions_per_round", "run.seed"),
    "reference": ("data", "zoo", "loop.reference", "loop.mix_alpha"),
    "dpo": ("data", "dpo", "run.seed"),
    "expo": ("data", "eval", "judge", "loop.alpha", "loop.alpha_grid", "loop.alpha_dev_samples"),
}
OPERATIONAL = ("ray", "run.name", "run.out_dir", "loop.rounds", "synth", "sft", "judge.pool", "judge.api_concurrency",
               "judge.api_timeout_s", "judge.api_retries", "data.decoders", "data.decode_timeout_s",
               "build.queue_size", "build.out", "build.stall_timeout_s", "build.max_attempts",
               "build.max_judge_failure_rate", "build.max_generation_failure_rate", "zoo.*.replicas",
               "zoo.*.resources", "dpo.max_failures", "dpo.checkpoint_every", "dpo.ref_batch_size", "eval.batch_size",
               # how an endpoint is reached and paid for, not what it answers
               "judge.api_timeout_s", "judge.api_backoff_s", "judge.api_backoff_max_s", "judge.api_breaker_failures",
               "judge.api_breaker_cooldown_s", "judge.api_requests_per_minute", "judge.api_tokens_per_minute",
               "judge.api_cache_dir", "judge.api_key_env", "judge.price_input_per_mtok", "judge.price_output_per_mtok",
               "judge.rm_batch_size", "eval.judge.batch_size", "eval.judge.num_cpus", "eval.judge.num_gpus",
               "eval.judge.api_concurrency", "eval.judge.api_timeout_s", "eval.judge.api_key_env")


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, val in node.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    if isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        return {k: v for i, val in enumerate(node) for k, v in _flat(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: node}


def _under(key: str, prefixes) -> bool:
    import fnmatch

    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatch(key, p) or fnmatch.fnmatch(key, p + ".*")
               for p in prefixes)


def stage_keys(flat: dict, stage: str) -> dict:
    """The part of a (flattened) config that a stage's results depend on."""
    claimed = [p for ps in STAGE_KEYS.values() for p in ps]
    return {k: v for k, v in flat.items() if not _under(k, OPERATIONAL)
            and (_under(k, STAGE_KEYS.get(stage, ())) or not _under(k, claimed))}


def world_identity(cfg: Config) -> dict:
    """What the data is, beyond its paths: the manifests' contents and the synthetic world's spec."""
    return {"manifests": {s: file_digest(getattr(cfg.data, s)) for s in ("train", "dev", "test")},
            "synth": file_digest(Path(cfg.data.root) / "synth.json")}


class RunState:
    """state.json: what each round has finished, its results, and the digest of the inputs of
    every finished stage (config keys it depends on, the data, the zoo's checkpoints), so a
    resume with other inputs is refused instead of mixed in."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.dir = run_dir
        self.path = run_dir / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"rounds": {}}
        self.flat = _flat(cfg.model_dump(mode="json"))
        self.extra = {"world": world_identity(cfg), "checkpoints": {m.name: checkpoint_identity(m.path) for m in cfg.zoo}}
        self.config_digest = digest(self.flat)
        self.data.setdefault("inputs", {})  # "<t>:<stage>" -> {"digest", "config"}
        self.data.setdefault("configs", {})  # config digest -> flattened config (for the message on a change)
        self.data["config"] = hashlib.sha1(cfg.to_yaml().encode()).hexdigest()[:12]

    def inputs_digest(self, stage: str) -> str:
        return digest([stage_keys(self.flat, stage), self.extra])

    def check_resume(self) -> None:
        """FolderConflict naming what changed when a finished stage's inputs differ from this config's."""
        changes, legacy = [], []
        for t, stages in sorted(self.data["rounds"].items(), key=lambda kv: int(kv[0])):
            for stage in stages:
                if stage not in STAGE_KEYS:
                    continue
                rec = self.data["inputs"].get(f"{t}:{stage}")
                if rec is None:
                    legacy.append(f"{t}:{stage}")
                elif rec["digest"] != self.inputs_digest(stage):
                    changes.append(f"round {t} {stage}: {self._diff(stage, rec)}")
        if legacy:
            log(f"warning: {self.path}: stages {', '.join(legacy)} were finished before vpref recorded their inputs; "
                f"they are kept as they are")
        if changes:
            raise FolderConflict(
                f"{self.dir} (run.out_dir) holds finished stages made from other inputs; resuming would mix them with "
                f"this config's:\n  " + "\n  ".join(changes[:8]) + ("\n  ..." if len(changes) > 8 else "") +
                f"\n  Use another run.out_dir for these settings, or put them back ({self.dir / 'config.yaml'} holds "
                f"the settings of the finished stages)")

    def _diff(self, stage: str, rec: dict) -> str:
        old = self.data["configs"].get(rec.get("config"), {})
        now, was = stage_keys(self.flat, stage), stage_keys(old, stage) if old else {}
        keys = [k for k in sorted(set(now) | set(was)) if now.get(k) != was.get(k)] if old else []
        out = [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in keys[:4]]
        old_extra = rec.get("extra") or {}
        if old_extra.get("world") not in (None, self.extra["world"]):
            out.append("the data changed (manifest contents or the synthetic world)")
        changed = [m for m, c in (old_extra.get("checkpoints") or {}).items() if self.extra["checkpoints"].get(m) != c]
        if changed:
            out.append(f"zoo checkpoints changed: {', '.join(changed)}")
        return "; ".join(out) or "its config digest changed"

    def get(self, t: int, stage: str):
        return self.data["rounds"].get(str(t), {}).get(stage)

    def put(self, t: int, stage: str, result) -> None:
        self.data["rounds"].setdefault(str(t), {})[stage] = result
        if stage in STAGE_KEYS:
            self.data["configs"].setdefault(self.config_digest, self.flat)
            self.data["inputs"][f"{t}:{stage}"] = {"digest": self.inputs_digest(stage), "config": self.config_digest,
                                                   "extra": self.extra}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    def stage(self, t: int, stage: str, fn):
        """Run `fn` unless this stage of round t is already done; return its result."""
        done = self.get(t, stage)
        if done is not None:
            log(f"round {t}: {stage} already done, skipped")
            return done
        t0 = time.perf_counter()
        progress(f"round {t} {stage}", f"round {t}: {stage} ...", transient=True)
        result = fn()
        result["seconds"] = round(time.perf_counter() - t0, 2)
        progress(f"round {t} {stage}", f"round {t}: {stage} done in {result['seconds']:.0f}s")
        self.put(t, stage, result)
        return result


def round_questions(train: list[Sample], cfg: Config, t: int) -> list[Sample]:
    """The questions of round t: a fresh seeded sample of the train split (or all of it)."""
    k = cfg.loop.questions_per_round
    if k is None or k >= len(train):
        return train
    order = np.random.default_rng([cfg.run.seed, t]).permutation(len(train))[:k]
    return [train[i] for i in sorted(order)]


def _split(cfg: Config, name: str, rejects: Path) -> list[Sample]:
    m = load_manifest(getattr(cfg.data, name), cfg.data.root)
    log(m.summary())
    append_rejects(rejects, m.rejects)
    return m.samples


def require_questions(cfg: Config, split: str, usable: list, rejects: Path) -> None:
    """A split with no usable question stops the command here, not with a crash later."""
    if usable:
        return
    path = getattr(cfg.data, split)
    rows = load_manifest(path, cfg.data.root).counts()["rows"]
    raise InputError(f"the {split} split ({path}, data.{split}) has no usable questions: all {rows} were rejected "
                     f"(bad rows, or videos that do not decode); the reasons are in {rejects}. Fix those rows or "
                     f"videos, or point data.{split} at another manifest")


def run(cfg: Config) -> dict:
    """Run (or resume) the Iter-W2S-RLAIF rounds of `cfg`; returns the metrics.  The run folder
    is locked while it runs; a folder whose finished stages came from other inputs is refused."""
    from vpref import preflight

    preflight.require(cfg, "run")
    run_dir = Path(cfg.run.out_dir)
    with FolderLock(run_dir, "run", key="run.out_dir"):
        return _run(cfg, run_dir)


def _run(cfg: Config, run_dir: Path) -> dict:
    state = RunState(run_dir, cfg)
    state.check_resume()  # before config.yaml is written: it keeps the settings of the finished stages
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    policy_member = cfg.policy_member
    init_ray(cfg.ray)
    rejects = run_dir / "rejects.jsonl"
    train = _split(cfg, "train", rejects)[: cfg.build.max_samples]
    require_questions(cfg, "train", train, rejects)
    engine = DataEngine(cfg, run_dir / "actors")
    runner = None
    try:
        engine.wait_ready()
        runner = suite_runner(cfg, run_dir, rejects)
        test = Evaluator(engine, cfg, _split(cfg, cfg.eval.split, rejects), rejects,
                         extra_videos=runner.videos if runner else ())
        require_questions(cfg, cfg.eval.split, test.samples, rejects)
        if runner:
            runner.drop_videos(test.failed_videos, rejects)
        dev = Evaluator(engine, cfg, _split(cfg, "dev", rejects), rejects) if cfg.loop.alpha_grid else None
        if dev is not None:
            require_questions(cfg, "dev", dev.samples, rejects)
        theta = [str(Path(policy_member.path).resolve())]  # theta_0 = the SFT policy

        def evaluate(t: int, path: str) -> dict:
            engine.reload_policy(path, version=t)
            metrics = evaluate_round(test, runner, t, path, run_dir / f"round_{t}", cfg.eval.max_samples)
            log(f"round {t}: QA accuracy {metrics['accuracy'].get('qa', 0):.3f}, judge {metrics['judge']['overall']:.3f}, "
                f"{metrics['length']['words']:.1f} words")
            if runner:
                say(round_summary(t, metrics))
            return {"policy": path, "metrics": metrics}

        state.stage(0, "eval", lambda: evaluate(0, theta[0]))
        for t in range(1, cfg.loop.rounds + 1):
            rdir = run_dir / f"round_{t}"
            prev = state.get(t - 1, "policy") or theta[0]
            ref = _reference(cfg, state, t, prev, theta[0], rdir)
            judge_t = _round_judge(cfg, state, engine, t)  # the teacher, or a reward model distilled from it

            def data():
                engine.set_judge(judge_t)
                engine.reload_policy(prev, version=t - 1)  # the round samples from the previous policy
                res = engine.build(round_questions(train, cfg, t), rdir / "data", round_=t, policy_version=t - 1)
                card = write_card(rdir / "data", res.summary())
                return {"pairs": card["pairs"], "summary": res.summary(), "judge": judge_identity(engine.cfg)[0]}

            built = state.stage(t, "data", data)
            engine.set_judge(cfg.judge)  # the alpha search and evaluation stay on the teacher's scale
            if judge_t is not cfg.judge and cfg.distill.audit_samples:
                state.stage(t, "audit", lambda: _audit(cfg, engine, rdir, t))
            if built["pairs"] == 0:
                raise RuntimeError(f"round {t}: the judge produced no pairs (see {rdir / 'data' / 'README.md'})")
            def reference():
                # The policy actors hold theta_{t-1}; when that is the reference they score the pairs.
                holders = engine.policy_replicas() if ref == prev and policy_member.backend == "hf" else None
                if holders:
                    engine.reload_policy(prev, version=t - 1)
                path = reference_logps(ref, rdir / "data", rdir / "train" / "pairs_ref.parquet", cfg.data,
                                       cfg.dpo.ref_batch_size, shards=max(1, cfg.dpo.num_workers),
                                       num_cpus=cfg.dpo.cpus_per_worker, num_gpus=1 if cfg.dpo.use_gpu else 0,
                                       actors=holders)
                return {"pairs": str(path), "reference": ref, "scored_by": "policy actors" if holders else "tasks"}

            state.stage(t, "reference", reference)

            def dpo():
                d = cfg.dpo  # a Train job the cluster cannot place would wait forever: wait a bounded time
                ensure_placeable([{"CPU": d.cpus_per_worker, "GPU": d.gpus_per_worker if d.use_gpu else 0}] * d.num_workers,
                                 cfg.ray.placement_timeout_s, f"DPO training ({d.num_workers} Ray Train workers)",
                                 "Lower dpo.num_workers or dpo.cpus_per_worker, or add nodes", cfg)
                slept = engine.sleep(level=1)  # sleep-enabled vLLM generators lend their GPUs to training
                try:
                    r = train_dpo(cfg.dpo, cfg.data, prev, rdir / "train" / "pairs_ref.parquet", rdir / "train",
                                  name=f"{cfg.run.name}-round{t}", seed=cfg.run.seed + t)
                finally:
                    if slept:
                        engine.wake_up()
                return {"checkpoint": r.checkpoint, "final": r.final(), "curve": r.metrics, "restarts": r.restarts}

            trained = state.stage(t, "dpo", dpo)
            chosen = state.stage(t, "expo", lambda: _extrapolate(cfg, engine, dev, trained["checkpoint"], ref, rdir, t))
            state.put(t, "policy", chosen["policy"])
            state.stage(t, "eval", lambda: evaluate(t, chosen["policy"]))
        metrics = collect_metrics(cfg, state)
        write_report(run_dir, metrics)
        log(f"report: {run_dir / 'report.md'}")
        return metrics
    finally:
        if runner is not None and hasattr(runner.judge, "shutdown"):
            runner.judge.shutdown()
        engine.shutdown()


def _round_judge(cfg: Config, state: RunState, engine: DataEngine, t: int):
    """Round t's judge under the judge schedule (`distill`): the teacher (`judge`) for the first
    `teacher_rounds` rounds, then a reward model trained on the teacher's judgments (stage `rm`,
    once, or every round with `refresh`: from the last reward model, on all teacher judgments so
    far, the audits included)."""
    from vpref.config import JudgeConfig
    from vpref.train.rm import train_rm

    d, run_dir = cfg.distill, Path(cfg.run.out_dir)
    if not d.enabled or t <= d.teacher_rounds:
        return cfg.judge
    first = d.teacher_rounds + 1
    if t == first or d.refresh:
        def train() -> dict:
            sources = [run_dir / f"round_{k}" / "data" for k in range(1, first)]
            sources += [run_dir / f"round_{k}" / "audit" for k in range(first, t)
                        if (run_dir / f"round_{k}" / "audit" / "plan.json").is_file()]
            init = state.get(t - 1, "rm")["checkpoint"] if t > first else None
            slept = engine.sleep(level=1)  # sleep-enabled vLLM generators lend their GPUs to training
            try:
                r = train_rm(cfg.rm, cfg.data, [str(s) for s in sources], run_dir / f"round_{t}" / "rm",
                             name=f"{cfg.run.name}-rm{t}", seed=cfg.run.seed + t, init=init)
            finally:
                if slept:
                    engine.wake_up()
            log(f"round {t}: reward model {r.checkpoint}: held-out pairwise accuracy {r.accuracy}")
            return r.summary()

        rm = state.stage(t, "rm", train)
    else:
        rm = state.get(first, "rm")
    return JudgeConfig.model_validate({**cfg.judge.model_dump(), "kind": "reward_model", "model": rm["checkpoint"],
                                       "backend": d.backend})


def _audit(cfg: Config, engine: DataEngine, rdir: Path, t: int) -> dict:
    """The teacher judges `distill.audit_samples` questions of a reward-model round: a build
    folder `audit/` of its judgments and pairs (what a refresh learns from), and how often the
    reward model agreed with it."""
    from vpref.actors.writer import PairWriter, write_plan
    from vpref.data.schema import read_records, write_shard

    src, dst = rdir / "data", rdir / "audit"
    if dst.exists():
        shutil.rmtree(dst)  # an audit interrupted midway is redone whole
    dst.mkdir(parents=True)
    plan = json.loads((src / "plan.json").read_text())
    ids = sorted(plan["samples"])
    pick = np.random.default_rng([cfg.run.seed, t, 1]).permutation(len(ids))[:cfg.distill.audit_samples]
    sids = {ids[i] for i in pick}
    responses = [r for r in read_records(src, "responses") if r.sample_id in sids]
    items = [response_item(r.response_id, r.text, r.sample_id, s["question"], s.get("answer"), s.get("caption"),
                           s.get("family"), s.get("video"))
             for r in responses if r.error is None for s in [plan["samples"][r.sample_id]]]
    teacher, rubric, version = judge_identity(cfg)
    write_plan(dst, {**plan, "samples": {k: plan["samples"][k] for k in sids},
                     "expected": {k: plan["expected"][k] for k in sids}, "judge": teacher, "rubric": rubric,
                     "rubric_version": version, "pairwise": False})
    write_shard(dst, "responses", responses)
    write_shard(dst, "judgments", engine.judge_items(items))  # engine holds the teacher again
    status = PairWriter(str(dst), cfg.pairs.model_dump()).finalize()
    rm_scores = {j.response_id: j.scores.get("reward", j.overall) for j in read_records(src, "judgments")
                 if j.judge == plan["judge"] and j.ok}
    t_scores = {j.response_id: j.overall for j in read_records(dst, "judgments") if j.ok}
    t_pairs = [p for p in read_records(dst, "pairs")
               if p.chosen_response_id in rm_scores and p.rejected_response_id in rm_scores]
    rm_pairs = [p for p in read_records(src, "pairs") if p.sample_id in sids
                and p.chosen_response_id in t_scores and p.rejected_response_id in t_scores]
    agree = [rm_scores[p.chosen_response_id] > rm_scores[p.rejected_response_id] for p in t_pairs]
    right = [t_scores[p.chosen_response_id] > t_scores[p.rejected_response_id] for p in rm_pairs]
    out = {"questions": len(sids), "teacher": teacher, "reward_model": plan["judge"], "teacher_pairs": len(t_pairs),
           "rm_accuracy_on_teacher_pairs": float(np.mean(agree)) if agree else None, "rm_pairs": len(rm_pairs),
           "rm_pairs_teacher_agrees": float(np.mean(right)) if right else None, "judge_failures":
           status["judge_failures"], "folder": str(dst)}
    log(f"round {t}: audit of {len(sids)} questions by {teacher}: the reward model orders "
        f"{out['rm_accuracy_on_teacher_pairs']} of the teacher's pairs as it does; the teacher agrees with "
        f"{out['rm_pairs_teacher_agrees']} of the reward model's pairs")
    return out


def _reference(cfg: Config, state: RunState, t: int, prev: str, initial: str, rdir: Path) -> str:
    """ref_t: the previous policy (Iter-W2S), the SFT policy, or a TR-DPO-style mix."""
    if cfg.loop.reference == "previous":
        return prev
    if cfg.loop.reference == "initial":
        return initial
    prev_ref = (state.get(t - 1, "reference") or {}).get("reference", initial)
    out = rdir / "reference"
    if not (out / "model.safetensors").is_file():
        mix(prev, prev_ref, cfg.loop.mix_alpha, out)
    return str(out)


def _extrapolate(cfg: Config, engine: DataEngine, dev, dpo_dir: str, ref: str, rdir: Path, t: int) -> dict:
    """theta_t = theta_d + alpha (theta_d - ref_t); alpha fixed, or the best dev judge score."""
    if not cfg.loop.alpha_grid:
        return {"alpha": cfg.loop.alpha, "policy": str(extrapolate(dpo_dir, ref, cfg.loop.alpha, rdir / "policy"))}
    scores = {}
    for k, a in enumerate(cfg.loop.alpha_grid):
        cand = extrapolate(dpo_dir, ref, a, rdir / "alpha" / f"{a:g}")
        engine.reload_policy(cand, version=t)
        m, _ = dev(cfg.loop.alpha_dev_samples)
        scores[a] = m["judge"]["overall"]
        log(f"round {t}: alpha {a:g} -> dev judge score {scores[a]:.3f}")
    best = max(scores, key=lambda a: (scores[a], -a))  # ties go to the smaller step
    final = rdir / "policy"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(rdir / "alpha" / f"{best:g}", final)
    return {"alpha": best, "alpha_scores": scores, "policy": str(final)}


def collect_metrics(cfg: Config, state: RunState) -> dict:
    rounds = []
    for t in range(0, cfg.loop.rounds + 1):
        ev = state.get(t, "eval")
        if ev is None:
            break
        r = {"round": t, "policy": ev["policy"], "eval": ev["metrics"],
             "accuracy": ev["metrics"]["accuracy"].get("qa"), "judge_score": ev["metrics"]["judge"]["overall"],
             "mean_length": ev["metrics"]["length"]["words"]}
        if t > 0:
            data, dpo, expo = state.get(t, "data"), state.get(t, "dpo"), state.get(t, "expo")
            last = [m for m in dpo["curve"] if m["epoch"] == dpo["curve"][-1]["epoch"]]
            r.update(pairs=data["pairs"], dpo=dpo["final"], dpo_curve=dpo["curve"], dpo_restarts=dpo["restarts"],
                     dpo_accuracy=float(np.mean([m["rewards/accuracy"] for m in last])),
                     alpha=expo["alpha"], alpha_scores=expo.get("alpha_scores"),
                     seconds={s: state.get(t, s)["seconds"] for s in ("data", "reference", "dpo", "expo", "eval")})
        rounds.append(r)
    return {"name": cfg.run.name, "split": cfg.eval.split, "rounds": rounds}


def print_table(metrics: dict) -> None:
    j = metrics["rounds"][0]["eval"]["judge"]
    say(f"Test split: exact match and the build judge `{j['name']}` ({j['rubric_version']}); "
        "bootstrap 95% intervals in brackets")
    say(table(metrics["rounds"]))
    extra = suite_tables(metrics["rounds"], compact=True)
    if extra:
        say("\n" + extra)
