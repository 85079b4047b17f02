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
import ray

from vpref.actors.judge import response_item
from vpref.build import DataEngine, judge_identity
from vpref.cluster import init_ray
from vpref.config import Config
from vpref.data.card import write_card
from vpref.data.manifest import Sample, append_rejects, load_manifest
from vpref.data.world import FAMILIES, is_correct
from vpref.eval.evaluate import EvalRecord, compute_metrics
from vpref.eval.report import table, write_report
from vpref.train.dpo import reference_logps, train_dpo
from vpref.train.expo import extrapolate, mix
from vpref.utils import log


class RunState:
    """state.json: what each round has finished, and its results."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.dir = run_dir
        self.path = run_dir / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"rounds": {}}
        digest = hashlib.sha1(cfg.to_yaml().encode()).hexdigest()[:12]
        if self.data.get("config") not in (None, digest):
            log(f"warning: {self.path} was written with another config; finished stages are kept as they are")
        self.data["config"] = digest

    def get(self, t: int, stage: str):
        return self.data["rounds"].get(str(t), {}).get(stage)

    def put(self, t: int, stage: str, result) -> None:
        self.data["rounds"].setdefault(str(t), {})[stage] = result
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
        result = fn()
        result["seconds"] = round(time.perf_counter() - t0, 2)
        self.put(t, stage, result)
        return result


class Evaluator:
    """Greedy answers of the policy actors on a split, judged; the split's videos decoded once."""

    def __init__(self, engine: DataEngine, cfg: Config, samples: list[Sample], rejects_path: Path):
        self.engine, self.cfg = engine, cfg
        samples = engine.with_captions(samples, rejects_path.parent)  # the judge's context, as in training
        refs = {v: engine.decoders.submit(v) for v in sorted({s.video for s in samples})}
        self.clips, bad = {}, {}
        for v, ref in refs.items():
            try:
                ray.get(ref)
                self.clips[v] = ref
            except Exception as e:
                bad[v] = str(e).splitlines()[-1]
        from vpref.data.manifest import Reject

        append_rejects(rejects_path, [Reject("decode", 0, s.id, f"video {s.video}: {bad[s.video]}", s.to_row())
                                      for s in samples if s.video in bad])
        self.samples = [s for s in samples if s.video in self.clips]

    def __call__(self, limit: int | None = None) -> tuple[dict, list[dict]]:
        samples = self.samples[:limit]
        replicas = self.engine.policy_replicas()
        bs = self.cfg.eval.batch_size
        greedy = {"temperature": 0.0, "n": 1, "max_new_tokens": self.cfg.eval.max_new_tokens}
        calls = []
        for k, i in enumerate(range(0, len(samples), bs)):
            chunk = samples[i:i + bs]
            actor = replicas[k % len(replicas)]
            calls.append(actor.generate.remote([self.clips[s.video] for s in chunk], [s.question for s in chunk],
                                               greedy, seed=i))
        answers = [c[0] for ref in calls for c in ray.get(ref)]
        items = [response_item(f"eval:{s.id}", a.text, s.id, s.question, s.answer, s.caption, s.family)
                 for s, a in zip(samples, answers)]
        judgments = self.engine.judge_items(items)
        records = [EvalRecord(s, a, j) for s, a, j in zip(samples, answers, judgments)]
        rows = [{"id": s.id, "family": s.family, "question": s.question, "reference": s.answer, "answer": a.text,
                 "correct": is_correct(s.family, a.text, s.answer) if s.answer and s.family in FAMILIES else None,
                 "judge": j.overall, "judge_scores": j.scores} for s, a, j in zip(samples, answers, judgments)]
        return compute_metrics(records), rows


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


def run(cfg: Config) -> dict:
    """Run (or resume) the Iter-W2S-RLAIF rounds of `cfg`; returns the metrics."""
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    state = RunState(run_dir, cfg)
    policy_member = cfg.policy_member
    if policy_member is None:
        raise ValueError("the zoo has no policy member (set policy: true on the model being trained)")
    init_ray(cfg.ray)
    rejects = run_dir / "rejects.jsonl"
    train = _split(cfg, "train", rejects)[: cfg.build.max_samples]
    engine = DataEngine(cfg, run_dir / "actors")
    engine.wait_ready()
    try:
        test = Evaluator(engine, cfg, _split(cfg, cfg.eval.split, rejects), rejects)
        dev = Evaluator(engine, cfg, _split(cfg, "dev", rejects), rejects) if cfg.loop.alpha_grid else None
        theta = [str(Path(policy_member.path).resolve())]  # theta_0 = the SFT policy
        refs = [theta[0]]

        def evaluate(t: int, path: str) -> dict:
            engine.reload_policy(path, version=t)
            metrics, rows = test(cfg.eval.max_samples)
            rdir = run_dir / f"round_{t}"
            rdir.mkdir(parents=True, exist_ok=True)
            with open(rdir / "eval_answers.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            log(f"round {t}: QA accuracy {metrics['accuracy'].get('qa', 0):.3f}, judge {metrics['judge']['overall']:.3f}, "
                f"{metrics['length']['words']:.1f} words")
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
    print(table(metrics["rounds"]))
