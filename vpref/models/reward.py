"""A Bradley-Terry reward model: an LM backbone with a scalar head read at the last token.

    r(x, y) = w . h_last(x + y)        h_last: the backbone's final hidden state at the end-of-turn
                                       token that closes the answer (what a causal LM has read all of)

The input is the judge's context (VLM-RLAIF's context-aware reward): the user turn holds an
instruction, the video's detailed caption, the question and -- when shown -- the reference answer;
the assistant turn is the answer.  A video LLM backbone of the zoo reads the frames too (through
the `VideoLM` facade); any other HF causal LM reads the text alone (the caption as the video's
proxy, as LLaVA-Hound's judge does).

A reward model folder is the backbone's own HF folder (`save_pretrained`: config, safetensors,
tokenizer, preprocessor) plus `reward_head.safetensors` (the head, `score.weight`, 1 x hidden)
and `reward_model.json` (how inputs are built, the calibration to the teacher's rubric scale, what
it was trained on).  `RewardModel.load` reads a plain backbone folder (a new, zero head) and a
reward model folder (the trained head) through the same path, so training can continue from a
trained reward model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"
FORMAT = 1
NO_CONTEXT = "(no description available)"
INSTRUCTION = "Rate the answer to a question about a video. The video is described below."
PROMPT = "{instruction}\nVideo description: {caption}\nQuestion: {question}"
REFERENCE = "\nReference answer: {reference}"
PROMPT_VERSION = hashlib.sha1((INSTRUCTION + PROMPT + REFERENCE).encode()).hexdigest()[:10]
VISION_PREFIXES = ("visual.", "vision_tower.", "multi_modal_projector.")  # unused in text mode: frozen


def rm_prompt(question: str, caption: str | None, reference: str | None = None) -> str:
    """The user turn the reward model reads before the answer."""
    text = PROMPT.format(instruction=INSTRUCTION, caption=caption or NO_CONTEXT, question=question)
    return text + (REFERENCE.format(reference=reference) if reference else "")


@dataclass
class RMItem:
    """One (context, answer) to score.  `video` is read only by video reward models."""

    question: str
    answer: str
    caption: str | None = None
    reference: str | None = None
    video: str | None = None


@dataclass
class RMBatch:
    inputs: dict[str, torch.Tensor]
    last: torch.Tensor  # (B,) position of the token the head reads

    def to(self, device) -> "RMBatch":
        return RMBatch({k: v.to(device) for k, v in self.inputs.items()}, self.last.to(device))


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an answer (the chat format's end of turn, else end of sequence)."""
    return next(i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
                if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


def text_ids(tokenizer, eos_id: int, item: RMItem, show_reference: bool) -> list[int]:
    """Token ids of a text reward model's input: the chat prompt, then the answer and its end of
    turn, tokenised separately (so an answer's tokens are the ones the generator produced)."""
    prompt = rm_prompt(item.question, item.caption, item.reference if show_reference else None)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    p = tokenizer(text, add_special_tokens=False)["input_ids"]
    return p + tokenizer(item.answer, add_special_tokens=False)["input_ids"] + [eos_id]


def read_meta(path: str | Path) -> dict | None:
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def is_reward_model(path: str | Path) -> bool:
    return (Path(path) / HEAD_FILE).is_file()


def rm_digest(path: str | Path) -> str:
    """A short id of a trained reward model: its head and its training record (not the backbone's
    bytes, which would mean hashing gigabytes)."""
    h = hashlib.sha1((Path(path) / HEAD_FILE).read_bytes())
    meta = read_meta(path) or {}
    h.update(json.dumps({k: meta.get(k) for k in ("trained_on", "pairs", "teacher", "backbone_init")},
                        sort_keys=True).encode())
    return h.hexdigest()[:10]


def calibrate(reward: float, calibration: dict | None) -> float:
    """The teacher's rubric scale from a raw reward (see `fit_calibration`); without a
    calibration, the raw reward itself."""
    if not calibration or calibration.get("kind") == "none":
        return float(reward)
    if calibration["kind"] == "quantile":
        return float(np.interp(reward, calibration["rewards"], calibration["scores"]))
    v = calibration["a"] * reward + calibration["b"]
    return float(min(calibration["hi"], max(calibration["lo"], v)))


def fit_calibration(rewards, scores, heldout_rewards=(), heldout_scores=(), kind: str = "quantile",
                    knots: int = 51) -> dict:
    """A monotone map from raw reward to the teacher's score, fitted on judged answers.

    * quantile: the reward at quantile q maps to the teacher's score at quantile q (piecewise
      linear between `knots` quantiles): the RM's scores have the teacher's distribution, so a
      pair margin selects about as many pairs as it did for the teacher.
    * linear: least squares, teacher score ~ a * reward + b, clipped to the teacher's range: the
      expected teacher score given the reward.  A weak RM's expected scores crowd the middle,
      so few pairs pass a margin made for the teacher's scores.

    Both keep the RM's order; held-out answers check the fit (R^2, and Spearman's rho)."""
    r, s = np.asarray(rewards, float), np.asarray(scores, float)
    if len(r) < 2 or np.ptp(r) == 0:
        return {"kind": "none", "n": int(len(r)), "why": "fewer than two distinct rewards"}
    out: dict = {"kind": kind, "n": int(len(r)), "lo": float(s.min()), "hi": float(s.max())}
    if kind == "quantile":
        q = np.linspace(0, 1, knots)
        xr, ys = np.quantile(r, q), np.quantile(s, q)
        keep = np.concatenate([[True], np.diff(xr) > 0])  # np.interp needs increasing knots
        out.update(rewards=xr[keep].tolist(), scores=ys[keep].tolist())
    elif kind == "linear":
        a, b = np.polyfit(r, s, 1)
        out.update(a=float(a), b=float(b))
    else:
        raise ValueError(f"unknown calibration {kind!r}; use quantile or linear")
    out["r2_train"] = _r2(np.array([calibrate(x, out) for x in r]), s)
    if len(heldout_rewards) >= 2:
        hr, hs = np.asarray(heldout_rewards, float), np.asarray(heldout_scores, float)
        out.update(r2_heldout=_r2(np.array([calibrate(x, out) for x in hr]), hs), n_heldout=int(len(hr)),
                   spearman_heldout=_spearman(hr, hs))
    return out


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if np.ptp(ra) and np.ptp(rb) else 0.0


def _r2(pred, truth) -> float:
    ss = float(((truth - truth.mean()) ** 2).sum())
    return float(1 - ((truth - pred) ** 2).sum() / ss) if ss > 0 else 0.0


class RewardModel(nn.Module):
    """Backbone body + scalar head.  `lm` (the whole HF model, kept outside the module tree so an
    unused LM head never reaches DDP) is what gets saved; `body` is its base model."""

    def __init__(self, lm, tokenizer, path: str, kind: str, video: bool, vlm=None, meta: dict | None = None):
        super().__init__()
        from vpref.models.video_lm import SUPPORTED

        self.__dict__["lm"] = lm
        self.body = lm.base_model
        self.score = nn.Linear(lm.config.get_text_config().hidden_size, 1, bias=False)
        nn.init.zeros_(self.score.weight)  # r = 0 everywhere at the start: no pair is preferred yet
        self.tokenizer, self.path, self.kind, self.video = tokenizer, str(path), kind, video
        self.vlm = vlm  # the VideoLM facade of a video backbone (its prompts and video inputs)
        self.meta = meta or {}
        self.multimodal = kind in SUPPORTED
        self.eos_id = end_of_turn_id(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        if not video:  # text mode: a video backbone's vision tower gets no gradient
            for n, p in self.body.named_parameters():
                if n.startswith(VISION_PREFIXES):
                    p.requires_grad_(False)

    def train_top_layers(self, k: int) -> int:
        """Freeze the backbone except its last `k` decoder layers and final norm (the head always
        trains): backward then stops k layers down, the cheap way to fine-tune on few cores.
        Returns the number of trainable backbone parameters."""
        stacks = [m for n, m in self.body.named_modules() if n.rsplit(".", 1)[-1] == "layers"
                  and isinstance(m, nn.ModuleList) and not n.startswith(VISION_PREFIXES)]
        if not stacks:
            raise ValueError(f"{self.path}: found no decoder layer stack to train the top {k} layers of")
        layers = stacks[0]
        text_model = next(m for m in self.body.modules() if any(c is layers for c in m.children()))
        for p in self.body.parameters():
            p.requires_grad_(False)
        keep = list(layers[-k:]) + [getattr(text_model, "norm", None)]
        for m in keep:
            if m is not None:
                for p in m.parameters():
                    p.requires_grad_(True)
        return sum(p.numel() for p in self.body.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
             video: bool | None = None) -> "RewardModel":
        """A reward model folder, or a backbone folder to start one from (`video`: read frames;
        null: what the folder was trained with, else whenever the backbone is a video LLM)."""
        from safetensors.torch import load_file

        from vpref.models.video_lm import SUPPORTED, VideoLM, model_type

        path = Path(path)
        kind = model_type(path)
        meta = read_meta(path)
        if video is None:
            video = meta["video"] if meta else kind in SUPPORTED
        if video and kind not in SUPPORTED:
            raise ValueError(f"{path}: a video reward model needs a video LLM backbone ({sorted(SUPPORTED)}); "
                             f"{kind!r} reads text only (set rm.video: false)")
        if meta and meta.get("format", FORMAT) > FORMAT:
            raise ValueError(f"{path}: reward model format {meta['format']} is newer than this vpref ({FORMAT})")
        vlm = None
        if kind in SUPPORTED:
            vlm = VideoLM.load(path, dtype=dtype)
            lm, tok = vlm.model, vlm.tokenizer
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
            tok = AutoTokenizer.from_pretrained(path)
        if not tok.chat_template:
            raise ValueError(f"{path}: the tokenizer has no chat template; the reward model's input is a chat turn")
        rm = cls(lm, tok, str(path), kind, bool(video), vlm, meta)
        if is_reward_model(path):
            rm.score.weight.data.copy_(load_file(path / HEAD_FILE)["score.weight"])
        return rm.to(device=device, dtype=getattr(torch, dtype))

    def save(self, out: str | Path, meta: dict, lm=None) -> Path:
        """Write the reward model folder.  `lm`: the model to save in place of `self.lm` (a LoRA
        model merged for export)."""
        from safetensors.torch import save_file

        out = Path(out)
        (lm or self.lm).save_pretrained(out)
        if self.vlm is not None:  # the family's processor: tokenizer, chat template, video processor
            from vpref.models.video_processors import save_processor

            save_processor(self.vlm.processor, out)
        else:
            self.tokenizer.save_pretrained(out)
        save_file({"score.weight": self.score.weight.detach().float().cpu().contiguous()}, out / HEAD_FILE)
        full = {**self.meta, **meta, "format": FORMAT, "kind": self.kind, "video": self.video,
                "prompt_version": PROMPT_VERSION, "read": "last token (end of the answer's turn)"}
        (out / META_FILE).write_text(json.dumps(full, indent=2, default=str))
        return out

    # ------------------------------------------------------------------ inputs

    def batch(self, items: list[RMItem], clips=None, show_reference: bool | None = None) -> RMBatch:
        """Right-padded model inputs and the position the head reads.  `clips` (one decoded Clip
        per item) are needed by video reward models."""
        show = self.meta.get("show_reference", True) if show_reference is None else show_reference
        if self.video:
            if clips is None or len(clips) != len(items):
                raise ValueError("a video reward model needs one decoded clip per item")
            prompts = [rm_prompt(it.question, it.caption, it.reference if show else None) for it in items]
            b = self.vlm.scoring_batch([c.frames for c in clips], prompts, [it.answer for it in items],
                                       fps=[c.sampled_fps for c in clips])
            mask = b.response_mask.long()
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last response token (end of turn)
            return RMBatch(b.inputs, last)
        rows = [text_ids(self.tokenizer, self.eos_id, it, show) for it in items]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            attn[i, :len(r)] = 1
        inputs = {"input_ids": ids, "attention_mask": attn}
        if self.multimodal:  # a video LLM read as text: every token is of type text
            inputs["mm_token_type_ids"] = torch.zeros_like(ids)
        return RMBatch(inputs, torch.tensor([len(r) - 1 for r in rows]))

    # ------------------------------------------------------------------ rewards

    def forward(self, inputs: dict[str, torch.Tensor], last: torch.Tensor) -> torch.Tensor:
        hidden = self.body(**inputs).last_hidden_state
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score(h.to(self.score.weight.dtype)).squeeze(-1).float()

    @property
    def device(self) -> torch.device:
        return self.score.weight.device

    @torch.no_grad()
    def rewards(self, items: list[RMItem], clips=None, batch_size: int = 16) -> list[float]:
        """Raw rewards of items, `batch_size` sequences per forward."""
        self.eval()
        out = []
        for i in range(0, len(items), batch_size):
            b = self.batch(items[i:i + batch_size], None if clips is None else clips[i:i + batch_size])
            b = b.to(self.device)
            out += self(b.inputs, b.last).tolist()
        return out


class Clips:
    """Decoded clips of the videos a reward model reads, each decoded once (a small LRU)."""

    def __init__(self, num_frames: int, frame_size: int | None, timeout_s: float = 30.0, keep: int = 512):
        self.num_frames, self.frame_size, self.timeout_s, self.keep = num_frames, frame_size, timeout_s, keep
        self.cache: dict = {}

    def __call__(self, path: str):
        from vpref.data.video import decode_video

        if path not in self.cache:
            if len(self.cache) >= self.keep:
                self.cache.pop(next(iter(self.cache)))
            self.cache[path] = decode_video(path, self.num_frames, self.frame_size, timeout_s=self.timeout_s)
        return self.cache[path]


# --------------------------------------------------------------------------- vLLM (GPU only)


def export_sequence_classifier(rm_dir: str | Path, out: str | Path) -> Path:
    """The reward model as an HF `*ForSequenceClassification` folder (num_labels 1, `score.weight`):
    the layout vLLM's pooling runner serves natively and `AutoModelForSequenceClassification`
    loads.  Text backbones of families transformers has a sequence classifier for (Llama, Qwen2,
    ...); the pad id is set to a token the inputs never hold, so HF reads the same last token."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from vpref.train.checkpoint import load_state_dict

    rm_dir, out = Path(rm_dir), Path(out)
    meta = read_meta(rm_dir) or {}
    if meta.get("video"):
        raise ValueError(f"{rm_dir} reads video frames; vLLM serving is for text reward models (use backend hf)")
    cfg = AutoConfig.from_pretrained(rm_dir)
    tok = AutoTokenizer.from_pretrained(rm_dir)
    cfg.num_labels = 1
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    pad = next((i for i in (tok.pad_token_id, tok.convert_tokens_to_ids("<|endoftext|>"), tok.bos_token_id)
                if isinstance(i, int) and i >= 0 and i not in eos), None)
    if pad is None:
        raise ValueError(f"{rm_dir}: no token id other than the end-of-turn token to pad with")
    cfg.pad_token_id = pad
    try:
        model = AutoModelForSequenceClassification.from_config(cfg)
    except ValueError as e:
        raise ValueError(f"{rm_dir}: transformers has no sequence classifier for {cfg.model_type!r} ({e})") from None
    sd = {k: v for k, v in load_state_dict(rm_dir).items() if not k.startswith("lm_head.")}
    sd["score.weight"] = load_state_dict_head(rm_dir)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq")]:
        raise ValueError(f"{rm_dir}: export mismatch, missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / META_FILE).write_text(json.dumps({**meta, "exported_from": str(rm_dir)}, indent=2, default=str))
    return out


def load_state_dict_head(rm_dir: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(Path(rm_dir) / HEAD_FILE)["score.weight"]


class VLLMRewardModel:
    """A text reward model on a vLLM engine in pooling mode: the `*ForSequenceClassification`
    export, `LLM(runner="pooling")`, `classify` without the activation (the raw reward).  Token
    ids are built by `RewardModel`'s own text path, so HF and vLLM read the same sequence."""

    def __init__(self, rm_dir: str | Path, dtype: str = "bfloat16", vcfg=None):
        from transformers import AutoTokenizer

        from vpref.actors.vllm_backend import _base_engine_kwargs, import_vllm, prepare_ray_env, require_gpus
        from vpref.config import VLLMConfig

        vllm = import_vllm()
        vcfg = vcfg if vcfg is not None else VLLMConfig()
        require_gpus(vcfg.tensor_parallel_size)
        prepare_ray_env(vcfg.tensor_parallel_size)
        self.path, self.meta = str(rm_dir), read_meta(rm_dir) or {}
        export = Path(rm_dir) / "vllm_export"
        if not (export / "config.json").is_file():
            export_sequence_classifier(rm_dir, export)
        self.tokenizer = AutoTokenizer.from_pretrained(rm_dir)
        self.eos_id = end_of_turn_id(self.tokenizer)
        self._params = vllm.PoolingParams(use_activation=False)
        self.llm = vllm.LLM(**{**_base_engine_kwargs(export, dtype, vcfg), "runner": "pooling"})
        self.video = False

    def rewards(self, items: list[RMItem], clips=None, batch_size: int = 256) -> list[float]:
        show = self.meta.get("show_reference", True)
        prompts = [{"prompt_token_ids": text_ids(self.tokenizer, self.eos_id, it, show)} for it in items]
        outs = self.llm.classify(prompts, pooling_params=self._params, use_tqdm=False)
        return [float(o.outputs.probs[0]) for o in outs]

