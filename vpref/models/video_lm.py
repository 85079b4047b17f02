"""Load a Hugging Face video LLM by path and build its inputs: the one place prompts are made.

Qwen2-VL and Qwen2.5-VL (the first families supported) share a chat format and a video
preprocessor; the torch-only `VideoPreprocessor` stands in for transformers' torchvision one.
Prompt and response are tokenised separately and concatenated, so a response's tokens are the
same whether it is generated, scored for DPO or used as an SFT target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vpref.models.processor import VideoPreprocessor

SUPPORTED = {"qwen2_vl", "qwen2_5_vl"}
VIDEO_PAD = "<|video_pad|>"


def model_type(path: str | Path) -> str:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    return json.loads(cfg.read_text()).get("model_type", "?")


def chat_prompt(tokenizer, question: str, system: str | None = None) -> str:
    """The chat prompt for one video and one question, from the checkpoint's own chat template,
    with a single video placeholder (HF expands it below; vLLM expands it itself)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(VIDEO_PAD) != 1:
        raise ValueError(f"the chat template must emit exactly one {VIDEO_PAD} for one video, got {text.count(VIDEO_PAD)}")
    return text


@dataclass
class Batch:
    """Model inputs plus, for scoring batches, which positions hold response tokens."""

    inputs: dict[str, torch.Tensor]
    response_mask: torch.Tensor | None = None  # (B, L) True on response tokens (incl. the end token)

    def to(self, device) -> "Batch":
        inputs = {k: v.to(device) for k, v in self.inputs.items()}
        mask = self.response_mask.to(device) if self.response_mask is not None else None
        return Batch(inputs, mask)


class VideoLM:
    """A video LLM with its tokenizer and preprocessor."""

    def __init__(self, model, tokenizer, preprocessor: VideoPreprocessor, path: str | Path, kind: str):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.path = str(path)
        self.kind = kind
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", device: str = "cpu") -> "VideoLM":
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        kind = model_type(path)
        if kind not in SUPPORTED:
            raise ValueError(
                f"{path}: model_type {kind!r} is not supported yet; supported video LLM families: {sorted(SUPPORTED)}"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
        model.to(device).eval()
        return cls(model, tokenizer, VideoPreprocessor.from_pretrained(path), path, kind)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ prompts

    def prompt_ids(self, question: str, frames_shape: tuple[int, ...], system: str | None = None) -> list[int]:
        """Token ids of the prompt with the video placeholder expanded for a clip of this shape."""
        t, h, w = frames_shape[:3]
        n = self.preprocessor.num_video_tokens(t, h, w)
        text = chat_prompt(self.tokenizer, question, system).replace(VIDEO_PAD, VIDEO_PAD * n)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def response_ids(self, response: str) -> list[int]:
        """Token ids of an assistant answer, ending with the end-of-turn token."""
        return self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ batches

    def _video_inputs(self, clips, fps) -> dict[str, torch.Tensor]:
        v = self.preprocessor(list(clips), sampled_fps=fps)
        if self.kind != "qwen2_5_vl":  # only Qwen2.5-VL places video tokens in time
            v.pop("second_per_grid_ts")
        return v

    def _finish(self, rows: list[list[int]], clips, fps, left_pad: bool) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left_pad else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            attn[i, sl] = 1
        inputs = {"input_ids": ids, "attention_mask": attn, **self._video_inputs(clips, fps)}
        # transformers v5 places vision tokens by type: 0 text, 1 image, 2 video.
        inputs["mm_token_type_ids"] = (ids == self.video_token_id).long() * 2
        return inputs

    def generation_batch(self, clips, questions, fps=None, system=None) -> Batch:
        """Left-padded prompts (one per clip) ready for `generate`."""
        rows = [self.prompt_ids(q, np.shape(c), system) for c, q in zip(clips, questions)]
        return Batch(self._finish(rows, clips, fps, left_pad=True))

    def scoring_batch(self, clips, questions, responses, fps=None, system=None) -> Batch:
        """Right-padded prompt+response sequences and a mask of the response tokens."""
        rows, spans = [], []
        for c, q, r in zip(clips, questions, responses):
            p, a = self.prompt_ids(q, np.shape(c), system), self.response_ids(r)
            rows.append(p + a)
            spans.append((len(p), len(p) + len(a)))
        inputs = self._finish(rows, clips, fps, left_pad=False)
        mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
        for i, (a, b) in enumerate(spans):
            mask[i, a:b] = True
        return Batch(inputs, mask)


def sequence_logps(model, batch: Batch, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of log p(response token | prefix) per sequence: the quantity DPO compares."""
    logits = model(**batch.inputs).logits[:, :-1].float()
    targets = batch.inputs["input_ids"][:, 1:]
    mask = batch.response_mask[:, 1:].to(logits.dtype)
    # log_softmax + gather without materialising a (B, L, V) float copy twice
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total
