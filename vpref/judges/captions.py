"""Captions for manifests that have none (VLM-RLAIF's recipe): the judge's context.

Each video without a caption is decoded once, cut into `judge.caption_clips` consecutive clips
(default 3), each clip described by the zoo's captioner (the member with ``role: captioner``,
asked `caption.j2`'s instruction), and the descriptions joined in order ("Part 1 of 3: ...").
Captions are cached per video in the build folder (`captions.jsonl`, keyed by video, captioner and
clip count), so a resumed build does not caption twice; each row of that file names the questions
that got the generated caption (the provenance), and the dataset card counts them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vpref.data.manifest import Sample
from vpref.data.video import Clip
from vpref.utils import log

CACHE = "captions.jsonl"


def split_clip(clip: Clip, n: int, min_frames: int = 2) -> list[Clip]:
    """The clip's frames in `n` consecutive parts (fewer for a clip too short to give each part
    `min_frames`)."""
    t = len(clip.frames)
    parts = max(1, min(n, t // min_frames))
    return [Clip(clip.frames[idx[0]:idx[-1] + 1], tuple(clip.indices[i] for i in idx), clip.total_frames, clip.fps)
            for idx in np.array_split(np.arange(t), parts)]


def join_parts(texts: list[str]) -> str:
    n = len(texts)
    if n == 1:
        return texts[0].strip()
    return " ".join(f"Part {i + 1} of {n}: {t.strip()}" for i, t in enumerate(texts))


def _read_cache(path: Path) -> dict:
    cache = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                cache[(row["video"], row["model"], row.get("clips", 1))] = row
    return cache


def caption_samples(engine, samples: list[Sample], out: Path) -> list[Sample]:
    """Fill missing captions with the zoo's captioner (once per video); samples with a caption, or
    with no captioner in the zoo, pass unchanged.  `engine` is the build's DataEngine (its
    decoders and the captioner's generator actors)."""
    import ray

    need = sorted({s.video for s in samples if not s.caption})
    captioners = [m for m in engine.cfg.zoo if m.role == "captioner"]
    if not need or not captioners:
        return samples
    from vpref.judges.rubric import caption_instruction

    m, clips = captioners[0], engine.cfg.judge.caption_clips
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = _read_cache(out / CACHE)
    todo = [v for v in need if (v, m.name, clips) not in cache]
    parts: list[tuple[str, int, object]] = []  # (video, part index, clip ref)
    counts: dict[str, int] = {}
    for v in todo:
        try:
            clip = ray.get(engine.decoders.submit(v))
        except Exception:  # the build's own decode step rejects it with the cause
            continue
        pieces = split_clip(clip, clips)
        counts[v] = len(pieces)
        parts += [(v, i, ray.put(p)) for i, p in enumerate(pieces)]
    actors = engine.generators[m.name]
    calls = []
    for b, i in enumerate(range(0, len(parts), m.batch_size)):
        chunk = parts[i:i + m.batch_size]
        actor = actors[b % len(actors)]
        calls.append((chunk, actor.generate.remote([r for _, _, r in chunk], [caption_instruction()] * len(chunk))))
    texts: dict[str, dict[int, str]] = {}
    for chunk, ref in calls:
        for (v, i, _), comps in zip(chunk, ray.get(ref)):
            texts.setdefault(v, {})[i] = comps[0].text
    by_video: dict[str, list[str]] = {}
    for s in samples:
        if not s.caption:
            by_video.setdefault(s.video, []).append(s.id)
    with open(out / CACHE, "a") as f:
        for v in todo:
            if v in counts:
                pieces = [texts[v][i] for i in range(counts[v])]
                cache[(v, m.name, clips)] = {"video": v, "model": m.name, "clips": clips,
                                             "caption": join_parts(pieces), "parts": pieces, "samples": []}
        for v in need:  # provenance: every question of this folder that reads a generated caption
            row = cache.get((v, m.name, clips))
            ids = sorted(set(row["samples"]) | set(by_video.get(v, []))) if row else None
            if row and (v in counts or ids != row["samples"]):
                row["samples"] = ids
                f.write(json.dumps(row) + "\n")
    if todo:
        log(f"build: captioned {len(counts)} videos ({clips} clips each) with {m.name}")
    return [s if s.caption or (s.video, m.name, clips) not in cache else
            Sample(s.id, s.video, s.question, s.answer, cache[(s.video, m.name, clips)]["caption"],
                   {**s.meta, "caption_by": m.name})
            for s in samples]


def caption_stats(out_dir: str | Path) -> dict:
    """For the dataset card: how many videos and questions got a generated caption, by whom."""
    cache = _read_cache(Path(out_dir) / CACHE)
    return {"videos": len(cache), "questions": sum(len(r.get("samples", [])) for r in cache.values()),
            "models": sorted({r["model"] for r in cache.values()}),
            "clips": sorted({r.get("clips", 1) for r in cache.values()})}
