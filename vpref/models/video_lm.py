"""Load a Hugging Face video LLM of any registered family and build its inputs: the one entry
point the rest of vpref uses (`VideoLM`).

Prompts come from the checkpoint's own chat template with one video placeholder, and
transformers' own processor expands it (`Frame{i}:` lines for InternVL, timestamps for
Qwen3-VL, `<video>`*n for LLaVA, ...) and batches the vision tensors, so the HF path feeds the
model what vLLM builds from the same placeholder.  The response is tokenised separately and
appended to the expanded prompt, so a response's tokens are the same whether it is generated,
scored for DPO or used as an SFT target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vpref.models.families import SUPPORTED, family_of, get_family, model_type  # noqa: F401 (re-exported)
from vpref.models.processor import DEFAULT_FPS

TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def video_metadata(num_frames: int, height: int, width: int, fps: float | None) -> dict:
    """Metadata of a clip whose frames were already sampled at `fps` (all of them used), in the
    fields of `transformers.video_utils.VideoMetadata` plus `do_sample_frames` (vLLM reads and
    strips it).  The sampled fps gives Qwen2.5-VL's temporal positions (second_per_grid_ts =
    temporal_patch_size / fps) and Qwen3-VL's timestamps; unknown fps -> 24, what transformers
    assumes."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    f = float(fps) if fps else DEFAULT_FPS
    if f <= 0:
        f = DEFAULT_FPS
    return {"total_num_frames": int(num_frames), "fps": f, "duration": num_frames / f,
            "frames_indices": list(range(int(num_frames))), "width": int(width), "height": int(height),
            "do_sample_frames": False}


def video_messages(question: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]})
    return messages


def chat_prompt(processor, question: str, system: str | None = None) -> str:
    """The chat prompt for one video and one question, from the checkpoint's own chat template,
    with a single video placeholder (the processor expands it for HF; vLLM expands it itself).
    `processor`: a transformers processor (or a tokenizer with the chat template)."""
    text = processor.apply_chat_template(video_messages(question, system), tokenize=False,
                                         add_generation_prompt=True)
    token = getattr(processor, "video_token", None)
    if token is not None and text.count(token) != 1:
        raise ValueError(f"the chat template must write exactly one {token} for one video, got {text.count(token)}")
    return text


def adds_special_tokens(tokenizer, text: str) -> bool:
    """Whether to let the tokenizer add its special tokens (a BOS) to a rendered prompt: not when
    the template wrote the BOS itself -- transformers' apply_chat_template rule, used for the HF
    and the vLLM prompt alike."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def end_of_turn_id(tokenizer, chat_template: str | None = None) -> int:
    """The token the chat template writes after an assistant answer (<|im_end|>, </s>, ...):
    what generation stops on and what SFT/DPO targets end with."""
    marker = "vpref-answer"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=chat_template)
        after = text[text.index(marker) + len(marker):].strip()
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        special = set(tokenizer.all_special_ids)
        if ids and ids[0] in special:
            return int(ids[0])
    except Exception:  # a template that refuses this conversation: fall back to the tokenizer's eos
        pass
    if tokenizer.eos_token_id is None:
        raise ValueError("cannot tell the end-of-turn token: no chat template end marker and no eos token")
    return int(tokenizer.eos_token_id)


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
    """A video LLM with its processor and family."""

    def __init__(self, model, processor, path: str | Path, family):
        self.model = model
        self.processor = processor
        self.family = get_family(family) if isinstance(family, str) else family
        self.path = str(path)
        self.kind = self.family.model_type
        tok = processor.tokenizer
        self.eos_id = end_of_turn_id(tok, processor.chat_template)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        gen = [gen] if isinstance(gen, int) else list(gen or [])
        self.stop_ids = sorted({self.eos_id, *([tok.eos_token_id] if tok.eos_token_id is not None else []), *gen})

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", device: str = "cpu") -> "VideoLM":
        from transformers import AutoModelForImageTextToText

        family = family_of(path)
        processor = family.load_processor(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
        model.to(device).eval()
        return cls(model, processor, path, family)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save_processor(self, out: str | Path) -> None:
        """Tokenizer, chat template and processor configs (genuine class names) into `out`."""
        from vpref.models.video_processors import save_processor

        save_processor(self.processor, out)

    # ------------------------------------------------------------------ prompts

    def prompt_text(self, question: str, system: str | None = None) -> str:
        return chat_prompt(self.processor, question, system)

    def _process(self, clips, questions, fps, system, padding_side: str) -> dict:
        """One processor call over the batch: transformers expands each prompt's placeholder for its
        clip, pads the text on `padding_side` and batches the vision tensors its own way."""
        if not (len(clips) == len(questions) == len(fps)):
            raise ValueError(f"got {len(clips)} clips, {len(questions)} questions and {len(fps)} fps values")
        metas, videos = [], []
        for c, f in zip(clips, fps):
            c = np.asarray(c)
            if c.ndim != 4 or c.shape[-1] != 3:
                raise ValueError(f"frames must be uint8 (T, H, W, 3), got shape {c.shape}")
            videos.append(c)
            metas.append({k: v for k, v in video_metadata(*c.shape[:3], f).items() if k != "do_sample_frames"})
        texts = [self.prompt_text(q, system) for q in questions]
        special = {adds_special_tokens(self.tokenizer, t) for t in texts}  # one template: one answer
        return dict(self.processor(text=texts, videos=videos, video_metadata=metas, return_tensors="pt",
                                   padding=True, padding_side=padding_side, add_special_tokens=special.pop()))

    def prompt_inputs(self, frames, question: str, fps: float | None = None, system: str | None = None) -> dict:
        """One sample's processor output: token ids with the video expanded, and its vision tensors."""
        return self._process([frames], [question], [fps], system, "left")

    def prompt_ids(self, question: str, frames, fps: float | None = None, system: str | None = None) -> list[int]:
        """Token ids of the prompt with the video placeholder expanded for these frames."""
        return self.prompt_inputs(frames, question, fps, system)["input_ids"][0].tolist()

    def response_ids(self, response: str) -> list[int]:
        """Token ids of an assistant answer, ending with the end-of-turn token."""
        return self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ batches

    def _with_text(self, processed: dict, rows: list[list[int]], left_pad: bool) -> dict[str, torch.Tensor]:
        """The processor's vision tensors with these token rows, padded."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left_pad else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            attn[i, sl] = 1
        inputs = {k: v for k, v in processed.items() if k not in TEXT_KEYS}
        inputs.update(input_ids=ids, attention_mask=attn)
        if "mm_token_type_ids" in processed:  # Qwen: 0 text, 1 image, 2 video (transformers 5)
            inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(ids.tolist()))
        return inputs

    def generation_batch(self, clips, questions, fps=None, system=None) -> Batch:
        """Left-padded prompts (one per clip) ready for `generate`."""
        fps = fps if isinstance(fps, (list, tuple)) else [fps] * len(clips)
        processed = self._process(clips, questions, fps, system, "left")
        inputs = {k: v for k, v in processed.items() if k != "token_type_ids"}
        return Batch(inputs)

    def scoring_batch(self, clips, questions, responses, fps=None, system=None) -> Batch:
        """Right-padded prompt+response sequences and a mask of the response tokens."""
        fps = fps if isinstance(fps, (list, tuple)) else [fps] * len(clips)
        processed = self._process(clips, questions, fps, system, "right")
        rows, spans = [], []
        for ids, attn, r in zip(processed["input_ids"], processed["attention_mask"], responses):
            p, a = ids[attn.bool()].tolist(), self.response_ids(r)
            rows.append(p + a)
            spans.append((len(p), len(p) + len(a)))
        inputs = self._with_text(processed, rows, left_pad=False)
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
