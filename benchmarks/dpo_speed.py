"""DPO step speed: vpref's step vs the raw forward/backward floor vs TRL's DPOTrainer, plus loss agreement.

    python benchmarks/dpo_speed.py --out benchmarks/results/dpo_speed.json

Needs the demo's SFT policy and round-1 pairs with reference log-probs (`vpref synth && vpref sft
configs/demo.yaml --set "sft.members=[{name: policy, size: 1m, steps: 50}]"`, then a `vpref run`
round).  Everything runs in this one process with `torch.set_num_threads(--threads)`; every
figure is a median over `--steps` timed steps after `--warmup` untimed ones.  Step i of every
method uses the same pairs (the sorted pairs, i*B .. i*B+B-1), so all methods see the same batches.

Model sizes: `1m` is the SFT policy; `5m` is a random-weight tiny Qwen2.5-VL built here with
`vpref.models.tiny.build_tiny` on the policy's tokenizer.  The demo's DPOConfig is used
(sigmoid, beta 0.1, NLL coef 1.0, AdamW lr 5e-4, clip 1.0).  Videos are decoded once, before
timing (`_Clips` caches decoded clips, as every train_loop worker does).

Methods (per model size and batch size B pairs; 2B sequences per forward):
* vpref_step: one iteration of `vpref.train.dpo.train_loop`'s loop body in one process (world
  size 1, no DDP wrapper -- train_loop applies none then either): lr schedule, `pair_batch` (text
  + video preprocessing), `logps_and_counts`, `dpo_loss`, backward, `metrics()`, clip, AdamW,
  zero_grad, metric averaging and the per-step progress files (written to a temp folder).
* vpref_compute: vpref_step minus its `pair_batch` time (the compute on built tensors).
* floor: the same model on the same batch tensors: one forward over the 2B sequences, a plain
  summed token NLL over the response tokens, backward, clip, the same AdamW step.
* trl_video_custom_collator: TRL's DPOTrainer on the video batches.  TRL's own collator has no
  video path, so this uses a user collator that calls vpref's `pair_batch` (see "trl_video").
* vpref_text / trl_text: text-only pairs (the prompts without the video): TRL's DPOTrainer with
  precomputed reference log-probs, and vpref's functions (`logps_and_counts`, `dpo_loss`) on a
  text batch built here with the tokenizer (asserted token-identical to TRL's batch).
* trl_text_with_ref_model: TRL text-only with `precompute_ref_log_probs=False` (a reference
  forward every step; vpref never does that -- its reference log-probs are computed once per round).

TRL's per-step time is measured from `on_step_begin` to `on_step_end` (forward, loss, backward,
clip, AdamW, scheduler; its collation happens before `on_step_begin`); vpref_compute, floor and
vpref_text are timed on batches built beforehand to match.  vpref/floor steps run inside TRL's
`on_step_end` callback, interleaved step by step with TRL's, so load from other processes hits
every method alike.

Loss agreement: identical policy/reference log-probs go to vpref's `dpo_loss` and to TRL's own
loss code, `DPOTrainer._compute_loss`, called on a DPOTrainer built from a DPOConfig for each
loss (the model argument is a stub returning the given per-token log-probs, since TRL computes
the policy log-probs inside `_compute_loss`; reference log-probs come from the batch, as with
`precompute_ref_log_probs=True`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpref.config import load_config
from vpref.models.video_lm import Batch, VideoLM
from vpref.train.dpo import _Clips, _load_parts, _lr_factor, logps_and_counts, pair_batch, pair_loss, score_pairs
from vpref.train.losses import dpo_loss
from vpref.utils import quiet_libraries

SERIES = ["vpref_step", "vpref_compute", "vpref_batch_build", "floor", "trl_video_custom_collator",
          "vpref_text", "trl_text", "trl_text_with_ref_model"]


# --------------------------------------------------------------------------- helpers


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {}
    q = np.percentile(xs, [25, 50, 75])
    return {"median_ms": round(float(q[1]) * 1e3, 3), "p25_ms": round(float(q[0]) * 1e3, 3),
            "p75_ms": round(float(q[2]) * 1e3, 3), "n": len(xs)}


def _rows_for(rows: list[dict], step: int, b: int) -> list[dict]:
    return [rows[(step * b + k) % len(rows)] for k in range(b)]


def _params(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def text_prompt(tok, question: str) -> str:
    """The chat prompt of a question without its video (the text-only comparison)."""
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def text_pair_batch(tok, rows: list[dict]) -> Batch:
    """Chosen then rejected, prompt ids + response ids (+ end token), right-padded, mask on response."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    seqs, spans = [], []
    for key in ("chosen", "rejected"):
        for r in rows:
            p = tok(text_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
            a = tok(r[key], add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(p + a)
            spans.append((len(p), len(p) + len(a)))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, (a, b)) in enumerate(zip(seqs, spans)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        mask[i, a:b] = True
    return Batch({"input_ids": ids, "attention_mask": attn}, mask)


# --------------------------------------------------------------------------- the three step kinds


class VprefVideo:
    """train_loop's loop body (grad_accum 1, one process), on video pairs."""

    def __init__(self, path: str, cfg, clips: _Clips, total: int, progress: Path):
        model, processor, family = _load_parts(path)
        self.cfg, self.clips, self.total, self.progress = cfg, clips, total, progress
        self.model, self.params = model, _params(model)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.vlm = VideoLM(model, processor, path, family)
        self.device = next(model.parameters()).device
        self.warmup = int(cfg.warmup_ratio * total)
        self.progress.mkdir(parents=True, exist_ok=True)
        model.train()

    def step(self, step: int, rows_mb: list[dict]) -> tuple[float, float]:
        cfg, opt = self.cfg, self.opt
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, self.total, self.warmup)
        t0 = time.perf_counter()
        logs, built = [], 0.0
        for rows in [rows_mb]:  # grad_accum = 1
            tb = time.perf_counter()
            batch = pair_batch(self.vlm, self.clips, rows).to(self.device)
            built += time.perf_counter() - tb
            out = pair_loss(self.model, batch, rows, cfg)  # the same function train_loop calls
            (out.loss / cfg.grad_accum).backward()
            logs.append(out.metrics())
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        m = {k: float(np.mean([x[k] for x in logs])) for k in logs[0]}
        m.update(step=step + 1, epoch=0, lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - t0)
        (self.progress / "rank0.json").write_text(json.dumps({"pid": os.getpid(), "step": step + 1,
                                                              "resumed_from": None}))
        with open(self.progress / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        return time.perf_counter() - t0, built


class Floor:
    """Forward over the 2B sequences, summed token NLL on the response tokens, backward, clip, AdamW."""

    def __init__(self, path: str, cfg):
        model, *_ = _load_parts(path)
        self.cfg, self.model, self.params = cfg, model, _params(model)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        model.train()

    def step(self, batch: Batch) -> float:
        t0 = time.perf_counter()
        logits = self.model(**batch.inputs).logits[:, :-1]
        labels = batch.inputs["input_ids"][:, 1:].masked_fill(~batch.response_mask[:, 1:], -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


class VprefText:
    """vpref's functions (logps_and_counts, dpo_loss) + clip + AdamW on a pre-built text batch."""

    def __init__(self, path: str, cfg, total: int):
        model, processor, _ = _load_parts(path)
        self.cfg, self.model, self.tok, self.total = cfg, model, processor.tokenizer, total
        self.params = _params(model)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.warmup = int(cfg.warmup_ratio * total)

    def reference(self, batches: list[Batch]) -> list[torch.Tensor]:
        """Reference log-probs of every batch under the initial weights (what score_pairs does)."""
        self.model.eval()
        with torch.no_grad():
            refs = []
            for bt in batches:
                lp, _ = logps_and_counts(self.model, bt)
                b = lp.shape[0] // 2
                refs.append(torch.stack([lp[:b], lp[b:]], 1))
        self.model.train()
        return refs

    def step(self, step: int, batch: Batch, ref: torch.Tensor) -> float:
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, self.total, self.warmup)
        t0 = time.perf_counter()
        b = ref.shape[0]
        lp, n = logps_and_counts(self.model, batch)
        out = dpo_loss(lp[:b], lp[b:], ref[:, 0], ref[:, 1], cfg.loss, cfg.beta, cfg.label_smoothing,
                       n[:b], n[b:], cfg.nll_coef)
        out.loss.backward()
        out.metrics()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- TRL


def _trl_loss_args(cfg) -> dict:
    """vpref's DPOConfig as TRL arguments (the NLL term as TRL's `sft` loss, TRL 1.16 has no rpo_alpha)."""
    types, weights = [cfg.loss], [1.0]
    if cfg.nll_coef > 0:
        types.append("sft")
        weights.append(cfg.nll_coef)
    return {"beta": cfg.beta, "loss_type": types, "loss_weights": weights, "label_smoothing": cfg.label_smoothing}


def trl_trainer(path: str, records: list[dict], b: int, steps: int, cfg, *, precompute: bool = True,
                collator=None, callbacks=(), workdir: str, loss_args: dict | None = None):
    import trl
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoTokenizer, PrinterCallback

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    args = trl.DPOConfig(
        output_dir=workdir, per_device_train_batch_size=b, max_steps=steps, report_to=[], logging_steps=10**6,
        save_strategy="no", precompute_ref_log_probs=precompute, use_cpu=True, disable_tqdm=True,
        # fair settings: TRL 1.16 defaults bf16=True (even on CPU), gradient_checkpointing=True and a fused AdamW
        bf16=False, gradient_checkpointing=False, optim="adamw_torch",
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        train_sampling_strategy="sequential", dataloader_num_workers=0, remove_unused_columns=collator is None,
        seed=0, **(loss_args if loss_args is not None else _trl_loss_args(cfg)))
    tr = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                        data_collator=collator, callbacks=list(callbacks))
    tr.remove_callback(PrinterCallback)
    return tr


def _interleave_callback(side):
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        """Times TRL's step (on_step_begin .. on_step_end) and runs the side steps right after it."""

        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            if side is not None:
                side(state.global_step - 1)

    return Interleave()


def video_collator(vlm: VideoLM, clips: _Clips):
    """A user collator for TRL: vpref's pair_batch, with TRL's key names (completion_mask, ref_*_logps)."""

    def collate(examples):
        rows = [{"prompt": e["question"], "chosen": e["answer_chosen"], "rejected": e["answer_rejected"],
                 "video": e["video"]} for e in examples]
        bt = pair_batch(vlm, clips, rows)
        out = dict(bt.inputs)
        out["completion_mask"] = bt.response_mask.long()
        if "ref_chosen_logps" in examples[0]:
            out["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples])
            out["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples])
        return out

    return collate


def video_records(processor, rows):
    from vpref.models.video_lm import chat_prompt

    return [{"prompt": chat_prompt(processor, r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"],
             "video": r["video"], "question": r["prompt"], "answer_chosen": r["chosen"],
             "answer_rejected": r["rejected"]} for r in rows]


def text_records(tok, rows):
    return [{"prompt": text_prompt(tok, r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def trl_video_attempts(policy: str, rows: list[dict], cfg, workdir: str) -> dict:
    """TRL's own routes for video, and what each one does."""
    from transformers import AutoProcessor, AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    out = {}
    try:
        AutoProcessor.from_pretrained(policy)
        out["auto_processor"] = "loaded"
    except Exception as e:  # noqa: BLE001 - the error is the result
        out["auto_processor"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
    src = inspect.getsource(DataCollatorForVisionPreference.torch_call)
    out["vision_collator_passes_videos"] = "videos=" in src
    out["vision_collator_processor_call"] = "self.processor(images=images, text=prompts, ...)"
    tok = AutoTokenizer.from_pretrained(policy)
    recs = [{"prompt": text_prompt(tok, r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"],
             "video": r["video"]} for r in rows[:8]]
    try:
        tr = trl_trainer(policy, recs, 4, 1, cfg, precompute=False, workdir=workdir)
        batch = next(iter(tr.get_train_dataloader()))
        out["video_column_default_collator"] = {
            "error": None,
            "detected_as_vision_dataset": tr._is_vision_dataset,
            "batch_keys": sorted(batch),
            "result": "no error: the `video` column is not recognised (TRL looks for image/images only), it is "
                      "dropped as an unused column and training runs on text alone",
        }
    except Exception as e:  # noqa: BLE001
        out["video_column_default_collator"] = {"error": f"{type(e).__name__}: {e}"}
    return out


# --------------------------------------------------------------------------- loss agreement


def loss_agreement(policy: str, rows: list[dict], workdir: str, trials: int = 40, b: int = 16) -> list[dict]:
    """vpref's dpo_loss vs TRL's DPOTrainer._compute_loss on identical log-probs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy)
    recs = text_records(tok, rows[:2])
    base = SimpleNamespace(lr=1e-6, weight_decay=0.0, max_grad_norm=1.0)
    cases = [
        # name, vpref (loss, eps, nll_coef), TRL DPOConfig loss args, note
        ("sigmoid", ("sigmoid", 0.0, 0.0), {"loss_type": ["sigmoid"]}, ""),
        ("sigmoid, label_smoothing 0.1 (cDPO)", ("sigmoid", 0.1, 0.0),
         {"loss_type": ["sigmoid"], "label_smoothing": 0.1},
         "definitional: TRL 1.16's sigmoid ignores label_smoothing; vpref applies cDPO"),
        ("robust, label_smoothing 0.1", ("robust", 0.1, 0.0), {"loss_type": ["robust"], "label_smoothing": 0.1}, ""),
        ("robust, label_smoothing 0.0", ("robust", 0.0, 0.0), {"loss_type": ["robust"], "label_smoothing": 0.0}, ""),
        ("ipo", ("ipo", 0.0, 0.0), {"loss_type": ["ipo"]}, "both use per-token averaged log-ratios"),
        ("hinge", ("hinge", 0.0, 0.0), {"loss_type": ["hinge"]}, ""),
        ("sigmoid + NLL coef 1.0 (RPO)", ("sigmoid", 0.0, 1.0),
         {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]},
         ("definitional: TRL 1.16 has no rpo_alpha; its `sft` term is the token mean over all chosen tokens of the "
         "batch, vpref's NLL term the mean over pairs of per-pair token means (equal for one pair or equal lengths)")),
        ("robust 0.1 + NLL coef 0.5", ("robust", 0.1, 0.5),
         {"loss_type": ["robust", "sft"], "loss_weights": [1.0, 0.5], "label_smoothing": 0.1},
         "as above for the NLL term"),
    ]
    betas = [0.1, 0.5]

    def stub_model(per_token):
        def forward(**kw):
            z = torch.zeros_like(per_token)
            return SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z,
                                   is_top1=torch.zeros_like(per_token, dtype=torch.bool), aux_loss=None)
        return forward

    def make_inputs(gen, nb, dtype, equal_lengths=False):
        prompt = 5
        if equal_lengths:  # every answer of the batch equally long
            nc = nr = torch.full((nb,), int(torch.randint(2, 30, (1,), generator=gen)))
        else:
            nc, nr = torch.randint(2, 30, (nb,), generator=gen), torch.randint(2, 30, (nb,), generator=gen)
        n = torch.cat([nc, nr])
        width = prompt + int(n.max()) + 3
        cm = torch.zeros(2 * nb, width, dtype=torch.long)
        for i, k in enumerate(n.tolist()):
            cm[i, prompt:prompt + k] = 1
        attn = torch.zeros_like(cm)
        for i, k in enumerate(n.tolist()):
            attn[i, :prompt + k] = 1
        scale = torch.where(torch.rand(2 * nb, generator=gen) < 0.2, 40.0, 4.0)
        pol = -(n.to(torch.float64) * (0.3 + 2 * torch.rand(2 * nb, generator=gen, dtype=torch.float64)))
        ref = pol + scale.to(torch.float64) * torch.randn(2 * nb, generator=gen, dtype=torch.float64)
        pol, ref = pol.to(dtype), ref.to(dtype)
        shift = cm[:, 1:].to(dtype)
        per_token = shift * (pol / shift.sum(1)).unsqueeze(1)  # summed over positions: pol exactly-ish
        pol = per_token.sum(1)  # the exact sequence log-probs TRL will see
        inputs = {"input_ids": torch.zeros_like(cm), "attention_mask": attn, "completion_mask": cm,
                  "ref_chosen_logps": ref[:nb], "ref_rejected_logps": ref[nb:]}
        return inputs, per_token, pol, ref, n.to(dtype)

    table = []
    for name, (vloss, eps, nll), trl_kw, note in cases:
        for beta in betas:
            # a real DPOTrainer whose DPOConfig carries this loss: TRL's __init__ sets beta, loss_types,
            # loss_weights and label_smoothing; precompute_ref_log_probs=True makes _compute_loss take the
            # reference log-probs from the batch
            tr = trl_trainer(policy, recs, 2, 1, base, precompute=True, workdir=workdir,
                             loss_args={"beta": beta, **trl_kw})
            row = {"case": name, "beta": beta, "vpref": {"loss": vloss, "label_smoothing": eps, "nll_coef": nll},
                   "trl": {k: v for k, v in trl_kw.items()}, "note": note}
            for dtype in (torch.float64, torch.float32):
                gen = torch.Generator().manual_seed(0)
                d_batch, d_pair, d_eq, ref_scale = 0.0, 0.0, 0.0, 0.0
                for t in range(trials):
                    for mode in ("batch", "pair", "equal"):
                        nb = 1 if mode == "pair" else b
                        inputs, per_token, pol, ref, n = make_inputs(gen, nb, dtype, equal_lengths=mode == "equal")
                        with torch.no_grad():
                            trl_loss = tr._compute_loss(stub_model(per_token), inputs, False)
                            ours = dpo_loss(pol[:nb], pol[nb:], ref[:nb], ref[nb:], vloss, beta, eps,
                                            n[:nb], n[nb:], nll).loss
                        d = abs(float(trl_loss) - float(ours))
                        ref_scale = max(ref_scale, abs(float(ours)))
                        if mode == "batch":
                            d_batch = max(d_batch, d)
                        elif mode == "pair":
                            d_pair = max(d_pair, d)
                        else:
                            d_eq = max(d_eq, d)
                row[str(dtype).replace("torch.", "")] = {
                    "max_abs_diff_batch16": d_batch, "max_abs_diff_per_pair": d_pair,
                    "max_abs_diff_batch16_all_lengths_equal": d_eq, "max_abs_loss": ref_scale}
            table.append(row)
    return table


# --------------------------------------------------------------------------- one (size, batch) point


def run_point(size: str, path: str, b: int, rows: list[dict], cfg, data, clips: _Clips, args, workdir: Path,
              logp_checks: dict) -> dict:
    from transformers import AutoTokenizer

    n_steps = args.warmup + args.steps
    tok = AutoTokenizer.from_pretrained(path)
    used = [r for i in range(n_steps) for r in _rows_for(rows, i, b)]
    res: dict = {"size": size, "batch_pairs": b, "sequences_per_forward": 2 * b}
    times = {k: [] for k in SERIES}

    # --- video: TRL (user collator) hosting vpref_step and floor, interleaved
    vp = VprefVideo(path, cfg, clips, n_steps, workdir / f"progress-{size}-{b}")
    fl = Floor(path, cfg)
    widths = []

    def video_side(i):
        rs = _rows_for(rows, i, b)
        fb = pair_batch(fl_vlm, clips, rs)  # the floor's batch tensors, built untimed
        widths.append(fb.inputs["input_ids"].shape[1])
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for o in order:
            if o == 0:
                dt, built = vp.step(i, rs)
                times["vpref_step"].append(dt)
                times["vpref_batch_build"].append(built)
                times["vpref_compute"].append(dt - built)
            else:
                times["floor"].append(fl.step(fb))

    _, fproc, fam = _load_parts(path)
    fl_vlm = VideoLM(fl.model, fproc, path, fam)
    trl_vlm_model, tproc, _ = _load_parts(path)
    coll = video_collator(VideoLM(trl_vlm_model, tproc, path, fam), clips)
    cb = _interleave_callback(video_side)
    try:
        tr = trl_trainer(path, video_records(tproc, used), b, n_steps, cfg, collator=coll, callbacks=[cb],
                         workdir=str(workdir / "trl"))
        torch.set_num_threads(args.threads)
        if size not in logp_checks.setdefault("video", {}):
            # TRL's precomputed reference log-probs (its fused LM head, fed pixel_values_videos by the
            # user collator) vs vpref's score_pairs on the same pairs and the same initial weights
            m_ref, p_ref, _ = _load_parts(path)
            ours = score_pairs(VideoLM(m_ref, p_ref, path, fam), used[:2 * b], data, b)
            trl_c = tr.train_dataset["ref_chosen_logps"][:2 * b]
            trl_r = tr.train_dataset["ref_rejected_logps"][:2 * b]
            d = max(max(abs(o[1] - c), abs(o[2] - r)) for o, c, r in zip(ours, trl_c, trl_r))
            logp_checks["video"][size] = {"max_abs_diff_trl_vs_vpref_score_pairs": d, "pairs": 2 * b,
                                          "example_vpref": ours[0][1], "example_trl": trl_c[0]}
        tr.train()
        times["trl_video_custom_collator"] = cb.times
        res["trl_video_error"] = None
    except Exception as e:  # noqa: BLE001 - recorded, the vpref steps still run
        res["trl_video_error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        for i in range(len(times["floor"]), n_steps):
            video_side(i)
    res["seq_len_video"] = {"min": min(widths), "median": statistics.median(widths), "max": max(widths)}

    # --- text: TRL (precomputed reference) hosting vpref_text, interleaved
    vt = VprefText(path, cfg, n_steps)
    tbatches = [text_pair_batch(tok, _rows_for(rows, i, b)) for i in range(n_steps)]
    trefs = vt.reference(tbatches)
    res["seq_len_text"] = {"min": min(x.inputs["input_ids"].shape[1] for x in tbatches),
                           "median": statistics.median(x.inputs["input_ids"].shape[1] for x in tbatches),
                           "max": max(x.inputs["input_ids"].shape[1] for x in tbatches)}

    def text_side(i):
        times["vpref_text"].append(vt.step(i, tbatches[i], trefs[i]))

    cb = _interleave_callback(text_side)
    tr = trl_trainer(path, text_records(tok, used), b, n_steps, cfg, callbacks=[cb], workdir=str(workdir / "trl"))
    torch.set_num_threads(args.threads)
    # the text batches must be TRL's own, token for token
    same = True
    for i in range(n_steps):
        tb = tr.data_collator([tr.train_dataset[i * b + k] for k in range(b)])
        ours = tbatches[i]
        same &= (tb["input_ids"].shape == ours.inputs["input_ids"].shape
                 and torch.equal(tb["input_ids"], ours.inputs["input_ids"])
                 and torch.equal(tb["completion_mask"].bool(), ours.response_mask))
    res["text_batches_token_identical_to_trl"] = bool(same)
    trl_ref = torch.tensor([tr.train_dataset["ref_chosen_logps"], tr.train_dataset["ref_rejected_logps"]]).T
    our_ref = torch.cat(trefs).to(trl_ref.dtype)
    logp_checks.setdefault("text", {})[f"{size}/B{b}"] = {
        "max_abs_diff_trl_precomputed_vs_vpref": float((trl_ref - our_ref).abs().max()), "pairs": len(used)}
    tr.train()
    times["trl_text"] = cb.times

    # --- text: TRL with a reference model forward every step (no precompute)
    if not args.no_trl_ref:
        cb = _interleave_callback(None)
        tr = trl_trainer(path, text_records(tok, used), b, n_steps, cfg, precompute=False, callbacks=[cb],
                         workdir=str(workdir / "trl"))
        torch.set_num_threads(args.threads)
        tr.train()
        times["trl_text_with_ref_model"] = cb.times

    w = args.warmup
    res["stats"] = {k: _stats(v[w:]) for k, v in times.items() if v}
    res["step_times_ms"] = {k: [round(x * 1e3, 2) for x in v] for k, v in times.items() if v}
    med = {k: v["median_ms"] for k, v in res["stats"].items()}

    def ratio(a, c):
        return round(med[a] / med[c], 3) if a in med and c in med else None

    res["ratios"] = {
        "vpref_compute/floor": ratio("vpref_compute", "floor"),
        "vpref_step/floor": ratio("vpref_step", "floor"),
        "vpref_text/trl_text": ratio("vpref_text", "trl_text"),
        "vpref_compute/trl_video_custom_collator": ratio("vpref_compute", "trl_video_custom_collator"),
        "trl_text_with_ref_model/trl_text": ratio("trl_text_with_ref_model", "trl_text"),
    }
    print(f"[{size} B={b}] " + "  ".join(f"{k}={v}" for k, v in med.items()) + f"  ratios={res['ratios']}",
          flush=True)
    return res


# --------------------------------------------------------------------------- plot


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in results}, key=lambda s: float(s.rstrip("m")))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    styles = {"vpref_step": ("C0", "-", "o"), "vpref_compute": ("C0", "--", "o"), "floor": ("k", ":", "s"),
              "trl_video_custom_collator": ("C3", "-", "^"), "vpref_text": ("C2", "-", "o"),
              "trl_text": ("C1", "-", "^"), "trl_text_with_ref_model": ("C1", "--", "v")}
    for ax, size in zip(axes[0], sizes):
        pts = sorted((r for r in results if r["size"] == size), key=lambda r: r["batch_pairs"])
        xs = [r["batch_pairs"] for r in pts]
        for key, (c, ls, mk) in styles.items():
            ys = [r["stats"].get(key, {}).get("median_ms") for r in pts]
            if any(y is not None for y in ys):
                lo = [r["stats"][key]["median_ms"] - r["stats"][key]["p25_ms"] for r in pts]
                hi = [r["stats"][key]["p75_ms"] - r["stats"][key]["median_ms"] for r in pts]
                ax.errorbar(xs, ys, yerr=[lo, hi], color=c, ls=ls, marker=mk, capsize=3, label=key)
        ax.set_title(f"tiny Qwen2.5-VL {size}: DPO step (median, IQR bars)")
        ax.set_xlabel("pairs per step (2x sequences per forward)")
        ax.set_ylabel("ms per optimizer step")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/dpo_speed.json")
    ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--policy", default="runs/demo/sft/policy")
    ap.add_argument("--pairs", default="runs/demo/round_1/train/pairs_ref.parquet")
    ap.add_argument("--sizes", default="1m,5m", help="1m = the SFT policy; others are built with build_tiny")
    ap.add_argument("--batches", default="4,8,16")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per method and point")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-trl-ref", action="store_true", help="skip TRL text-only with a per-step reference forward")
    ap.add_argument("--no-loss-agreement", action="store_true")
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quiet_libraries()
    warnings.filterwarnings("ignore")
    import datasets
    import transformers
    import trl
    from transformers import AutoTokenizer

    from vpref.models.tiny import build_tiny

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()

    policy = str(Path(args.policy).resolve())
    if not (Path(policy) / "config.json").is_file():
        print(f"{policy} is missing: vpref synth && vpref sft configs/demo.yaml "
              "--set \"sft.members=[{name: policy, size: 1m, steps: 50}]\"", file=sys.stderr)
        return 2
    if not Path(args.pairs).is_file():
        print(f"{args.pairs} is missing (run a demo round first)", file=sys.stderr)
        return 2
    full = load_config(args.config)
    cfg, data = full.dpo, full.data
    rows = pq.read_table(args.pairs).sort_by("pair_id").to_pylist()
    batches = [int(x) for x in args.batches.split(",")]
    sizes = args.sizes.split(",")
    load0 = os.getloadavg()

    tmp = tempfile.TemporaryDirectory(prefix="vpref-dpo-speed-")
    workdir = Path(tmp.name)
    paths, models = {}, {}
    for size in sizes:
        if size == "1m":
            paths[size] = policy
        else:
            paths[size] = str(build_tiny(workdir / f"tiny-{size}", size, tokenizer=AutoTokenizer.from_pretrained(policy)))
        m, *_ = _load_parts(paths[size])
        models[size] = {"path": paths[size] if size == "1m" else f"build_tiny(<tmp>, {size!r}, tokenizer=policy's)",
                        "parameters": sum(p.numel() for p in m.parameters())}
        del m

    # decode every clip the run uses once, before timing (train_loop's _Clips cache does the same)
    clips = _Clips(data)
    need = {r["video"] for b in batches for i in range(args.warmup + args.steps) for r in _rows_for(rows, i, b)}
    t0 = time.perf_counter()
    for v in sorted(need):
        clips(v)
    decode_s = time.perf_counter() - t0

    video = trl_video_attempts(policy, rows, cfg, str(workdir / "trl"))
    torch.set_num_threads(args.threads)

    results, logp_checks = [], {}
    for size in sizes:
        for b in batches:
            results.append(run_point(size, paths[size], b, rows, cfg, data, clips, args, workdir, logp_checks))

    agreement = [] if args.no_loss_agreement else loss_agreement(policy, rows, str(workdir / "trl"))
    video["custom_collator"] = {
        "works": all(r["trl_video_error"] is None for r in results),
        "how": "DPOTrainer(data_collator=<user collator calling vpref.train.dpo.pair_batch>, "
               "remove_unused_columns=False): TRL's _compute_loss forwards every batch key except completion_mask "
               "and ref_*_logps to the model, so pixel_values_videos / video_grid_thw / second_per_grid_ts / "
               "mm_token_type_ids reach Qwen2.5-VL; precompute_ref_log_probs also runs through that collator",
        "errors": sorted({r["trl_video_error"] for r in results if r["trl_video_error"]}),
    }

    out = {
        "benchmark": "dpo_speed",
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        "machine": {
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "platform": platform.platform(),
            "processor": platform.processor(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "datasets": datasets.__version__,
            "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "dpo": cfg.model_dump(include={"loss", "beta", "label_smoothing", "nll_coef", "lr", "weight_decay",
                                           "max_grad_norm", "warmup_ratio", "grad_accum"}),
            "trl_loss_args": _trl_loss_args(cfg),
            "trl_overrides": {"bf16": False, "gradient_checkpointing": False, "optim": "adamw_torch",
                              "train_sampling_strategy": "sequential", "use_cpu": True},
            "data": {"num_frames": data.num_frames, "frame_size": data.frame_size},
            "pairs": str(args.pairs), "pairs_available": len(rows), "warmup_steps": args.warmup,
            "timed_steps": args.steps, "batches": batches, "sizes": sizes, "clip_decode_seconds_untimed": decode_s,
        },
        "models": models,
        "definitions": {
            "vpref_step": "train_loop loop body, one process: lr, pair_batch, logps_and_counts, dpo_loss, backward, "
                          "metrics, clip, AdamW, zero_grad, progress files",
            "vpref_compute": "vpref_step minus pair_batch (tokenisation + video preprocessing)",
            "floor": "same model, same batch tensors: forward over 2B sequences, summed response-token NLL, backward, "
                     "clip, AdamW",
            "trl_video_custom_collator": "TRL DPOTrainer step (on_step_begin..on_step_end), precomputed reference, "
                                         "user collator = vpref pair_batch (collation outside the window)",
            "vpref_text": "logps_and_counts + dpo_loss + backward + metrics + clip + AdamW on a pre-built text batch",
            "trl_text": "TRL DPOTrainer step, text-only, precompute_ref_log_probs=True",
            "trl_text_with_ref_model": "TRL DPOTrainer step, text-only, reference forward every step",
        },
        "trl_per_step_extra_work": [
            ("fused LM head (trl.trainer.utils.add_fused_lm_head): log-probs in tiles without full logits, plus "
            "entropy, mean_logits and is_top1 for its metrics"),
            "about a dozen metrics with gather + .item() per step; FLOP and token counting; NaN check; LR scheduler",
            ("precompute_ref_log_probs=False: a no-grad reference-model forward every step (vpref: never; reference "
            "log-probs are computed once per round by Ray tasks)"),
        ],
        "results": results,
        "trl_video": video,
        "logp_agreement": logp_checks,
        "loss_agreement": agreement,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2, default=str))
    png = Path(args.plot) if args.plot else out_path.with_suffix(".png")
    plot(results, png)
    print(json.dumps({"out": str(out_path), "plot": str(png), "seconds": out["seconds"],
                      "ratios": {f"{r['size']}/B{r['batch_pairs']}": r["ratios"] for r in results}}, indent=1))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
