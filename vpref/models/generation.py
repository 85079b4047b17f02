"""Batched Hugging Face `generate` over video questions (any family: `VideoLM` builds the inputs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vpref.models.video_lm import VideoLM


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "stop": ended its turn; "length": hit max_new_tokens


def generate(vlm: VideoLM, clips, questions, sampling, fps=None, seed: int | None = None) -> list[list[Completion]]:
    """`sampling.n` completions per (clip, question).  `sampling` has temperature, top_p,
    max_new_tokens, n, seed (a `SamplingConfig`); temperature 0 means greedy."""
    if not len(clips):
        return []
    batch = vlm.generation_batch(clips, questions, fps).to(vlm.device)
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=sampling.n,
        eos_token_id=vlm.stop_ids,
        pad_token_id=vlm.pad_id,
    )
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(do_sample=False)
    torch.manual_seed(sampling.seed if seed is None else seed)
    with torch.no_grad():
        out = vlm.model.generate(**batch.inputs, **kwargs)
    new = out[:, batch.inputs["input_ids"].shape[1]:].tolist()
    completions = []
    stops = set(vlm.stop_ids)
    for row in new:
        end = next((i for i, t in enumerate(row) if t in stops), None)
        if end is not None:
            row, reason = row[:end], "stop"
        else:
            row, reason = [t for t in row if t != vlm.pad_id], "length"
        completions.append(Completion(vlm.decode(row), len(row), reason))
    n = sampling.n
    return [completions[i * n : (i + 1) * n] for i in range(len(questions))]
