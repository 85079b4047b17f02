"""SFT warm start (`vpref sft`): tiny video LLMs of any family trained on the synthetic train split.

The point is a *weak* policy -- clearly above chance, clearly below perfect -- so preference
learning has room to work, and differently trained zoo members (families, sizes, steps, label
noise) so that the data engine samples from genuinely different response distributions.  One
member may start from a pretrained text model (`text_model: smollm2`: LLaVA-OneVision around
SmolLM2-135M-Instruct, `vpref.models.smollm2`), fluent from the first step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from vpref.config import Config, SFTMember
from vpref.data.manifest import append_rejects, decode_samples, load_manifest
from vpref.data.world import perturb
from vpref.eval.qa import accuracy_by_family, answer_all
from vpref.models.tiny import rubric_corpus, tiny_parts, train_tokenizer, world_corpus
from vpref.models.video_lm import VideoLM
from vpref.utils import log, progress


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def response_nll(model, batch) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens of a scoring batch."""
    logits = model(**batch.inputs).logits[:, :-1].float()
    targets = batch.inputs["input_ids"][:, 1:]
    mask = batch.response_mask[:, 1:]
    return torch.nn.functional.cross_entropy(logits[mask], targets[mask])


def noisy_answers(samples, noise: float, rng) -> list[str]:
    """A noisy annotator: a fixed share of the answers is wrong (one world word swapped), the
    same way every epoch."""
    return [perturb(s.answer, rng) if rng.random() < noise else s.answer for s in samples]


def member_parts(member: SFTMember, tokenizer, out: Path):
    """(model, processor) a member starts from: an earlier member's weights, SmolLM2 inside a
    LLaVA-OneVision, or a random tiny model of its family."""
    if member.init_from:
        vlm = VideoLM.load(out.parent / member.init_from)
        return vlm.model.train(), vlm.processor
    if member.text_model == "smollm2":
        from vpref.models.smollm2 import smollm2_video_lm

        return smollm2_video_lm(member.size, member.seed)
    return tiny_parts(tokenizer, member.family, member.size, member.seed)


def train_member(member: SFTMember, cfg: Config, tokenizer, train, clips, out: Path) -> VideoLM:
    sft = cfg.sft
    torch.manual_seed(member.seed)
    rng = np.random.default_rng(member.seed)
    model, processor = member_parts(member, tokenizer, out)
    vlm = VideoLM(model, processor, out, member.family)
    answers = noisy_answers(train, member.label_noise, rng)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=member.lr or sft.lr, weight_decay=sft.weight_decay)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(member.steps):
        for g in opt.param_groups:
            g["lr"] = (member.lr or sft.lr) * lr_at(step, member.steps, sft.warmup_steps)
        idx = rng.choice(len(train), size=min(sft.batch_size, len(train)), replace=False)
        chunk = [train[i] for i in idx]
        batch = vlm.scoring_batch(
            [clips[s.video].frames for s in chunk],
            [s.question for s in chunk],
            [answers[i] for i in idx],
            fps=[clips[s.video].sampled_fps for s in chunk],
        )
        loss = response_nll(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, member.steps // 5) == 0 or step + 1 == member.steps:
            progress(f"sft {member.name}", f"sft {member.name}: step {step + 1}/{member.steps} loss {np.mean(losses[-20:]):.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    model.eval()
    vlm.train_losses = (losses[0], float(np.mean(losses[-20:]))) if losses else (None, None)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    vlm.save_processor(out)
    return vlm


PROVENANCE = "vpref_sft.json"  # in each checkpoint folder: what it was trained from


def provenance(cfg: Config, member: SFTMember) -> dict:
    """What an SFT checkpoint is made from: the training data (the train manifest's contents and the
    synthetic world's spec), the decoding, the SFT settings, this member's own and those of the
    member it starts from."""
    from vpref.folders import file_digest

    by_name = {m.name: m for m in cfg.sft.members}
    return {"world": {"train": file_digest(cfg.data.train), "synth": file_digest(Path(cfg.data.root) / "synth.json")},
            "decode": {"num_frames": cfg.data.num_frames, "frame_size": cfg.data.frame_size},
            "sft": cfg.sft.model_dump(mode="json", exclude={"out", "members", "eval_max_new_tokens"}),
            "member": member.model_dump(mode="json"),
            "init_from": provenance(cfg, by_name[member.init_from]) if member.init_from in by_name else None}


def checkpoint_mismatches(cfg: Config) -> dict[str, str]:
    """Members whose checkpoint under sft.out is missing ("missing") or was not trained from this
    config and data (why); empty when every checkpoint matches."""
    out = {}
    for m in cfg.sft.members:
        folder = Path(cfg.sft.out) / m.name
        prov = folder / PROVENANCE
        if not (folder / "model.safetensors").is_file():
            out[m.name] = "missing"
        elif not prov.is_file():
            out[m.name] = f"{folder} has no {PROVENANCE} (trained before vpref recorded what checkpoints are made from)"
        else:
            old, now = json.loads(prov.read_text())["inputs"], provenance(cfg, m)
            diff = [k for k in now if old.get(k) != now[k]]
            if diff:
                out[m.name] = f"{folder} was trained from other {', '.join(diff)}"
    return out


def run_sft(cfg: Config) -> dict:
    """Train every `sft.members` entry, save each under `sft.out/<name>`, report dev accuracy.
    A checkpoint already there that was trained from other inputs is not overwritten."""
    from vpref.errors import FolderConflict

    other = {m: why for m, why in checkpoint_mismatches(cfg).items() if why != "missing"}
    if other:
        raise FolderConflict(f"sft.out={cfg.sft.out} holds checkpoints of other inputs ({'; '.join(other.values())}); "
                             f"vpref sft does not overwrite them: use another sft.out, or delete them first")
    out = Path(cfg.sft.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_m, dev_m = load_manifest(cfg.data.train, cfg.data.root), load_manifest(cfg.data.dev, cfg.data.root)
    for m in (train_m, dev_m):
        log(m.summary())
    train, clips, rej1 = decode_samples(train_m.samples, cfg.data.num_frames, cfg.data.frame_size,
                                        cfg.data.decode_timeout_s)
    dev, dev_clips, rej2 = decode_samples(dev_m.samples, cfg.data.num_frames, cfg.data.frame_size,
                                          cfg.data.decode_timeout_s)
    n_rej = append_rejects(out / "rejects.jsonl", train_m.rejects + dev_m.rejects + rej1 + rej2)
    if n_rej:
        log(f"{n_rej} rows set aside in {out / 'rejects.jsonl'}")
    if not train:
        from vpref.errors import InputError

        raise InputError(f"no usable training rows in {cfg.data.train} (data.train): all {len(train_m.samples) + len(train_m.rejects)} "
                         f"were rejected, or their videos do not decode; the reasons are in {out / 'rejects.jsonl'}")
    tokenizer = None  # the tiny members' shared vocabulary (a pretrained text model brings its own)
    if any(m.text_model is None and not m.init_from for m in cfg.sft.members):
        corpus = world_corpus() + rubric_corpus() + [t for s in train for t in (s.question, s.answer or "")]
        tokenizer = train_tokenizer(corpus, cfg.sft.vocab_size)
    report = {"members": {}, "train_questions": len(train), "dev_questions": len(dev)}
    for member in cfg.sft.members:
        t1 = time.perf_counter()
        vlm = train_member(member, cfg, tokenizer, train, clips, out / member.name)
        (out / member.name / PROVENANCE).write_text(json.dumps({"inputs": provenance(cfg, member)}, indent=2))
        train_s = time.perf_counter() - t1
        answers = [c.text for c in answer_all(vlm, dev, dev_clips, max_new_tokens=cfg.sft.eval_max_new_tokens)]
        acc = accuracy_by_family(dev, answers)
        report["members"][member.name] = {
            **member.model_dump(),
            "model_type": vlm.kind,
            "params": sum(p.numel() for p in vlm.model.parameters()),
            "train_seconds": round(train_s, 1),
            "loss_first_last": vlm.train_losses,
            "dev_accuracy": acc,
            "path": str(out / member.name),
        }
        log(f"sft {member.name}: dev accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "sft.json").write_text(json.dumps(report, indent=2))
    return report
