"""SFT warm start (`vpref sft`): tiny Qwen2.5-VL policies trained on the synthetic train split.

The point is a *weak* policy -- clearly above chance, clearly below perfect -- so preference
learning has room to work, and differently trained zoo members (sizes, steps, label noise) so
that the data engine samples from genuinely different response distributions.
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
from vpref.models.processor import VideoPreprocessor
from vpref.models.tiny import rubric_corpus, tiny_config, train_tokenizer, world_corpus
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


def train_member(member: SFTMember, cfg: Config, tokenizer, train, clips, out: Path) -> VideoLM:
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    sft = cfg.sft
    torch.manual_seed(member.seed)
    rng = np.random.default_rng(member.seed)
    if member.init_from:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out.parent / member.init_from)
    else:
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, member.size))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    vlm = VideoLM(model, tokenizer, VideoPreprocessor(min_pixels=56 * 56, max_pixels=112 * 112), out, "qwen2_5_vl")
    answers = noisy_answers(train, member.label_noise, rng)
    opt = torch.optim.AdamW(model.parameters(), lr=sft.lr, weight_decay=sft.weight_decay)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(member.steps):
        for g in opt.param_groups:
            g["lr"] = sft.lr * lr_at(step, member.steps, sft.warmup_steps)
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, member.steps // 5) == 0 or step + 1 == member.steps:
            progress(f"sft {member.name}", f"sft {member.name}: step {step + 1}/{member.steps} loss {np.mean(losses[-20:]):.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    model.eval()
    vlm.train_losses = (losses[0], float(np.mean(losses[-20:]))) if losses else (None, None)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    vlm.preprocessor.save_pretrained(out)
    return vlm


def run_sft(cfg: Config) -> dict:
    """Train every `sft.members` entry, save each under `sft.out/<name>`, report dev accuracy."""
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
        raise RuntimeError(f"no usable training rows in {cfg.data.train} (see {out / 'rejects.jsonl'})")
    corpus = world_corpus() + rubric_corpus() + [t for s in train for t in (s.question, s.answer or "")]
    tokenizer = train_tokenizer(corpus, cfg.sft.vocab_size)
    report = {"members": {}, "train_questions": len(train), "dev_questions": len(dev)}
    for member in cfg.sft.members:
        t1 = time.perf_counter()
        vlm = train_member(member, cfg, tokenizer, train, clips, out / member.name)
        train_s = time.perf_counter() - t1
        answers = [c.text for c in answer_all(vlm, dev, dev_clips, max_new_tokens=cfg.sft.eval_max_new_tokens)]
        acc = accuracy_by_family(dev, answers)
        report["members"][member.name] = {
            **member.model_dump(),
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
