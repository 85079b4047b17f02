"""The synthetic video-QA world: real mp4 clips of moving coloured shapes with questions,
reference answers and detailed captions (`vpref synth`).

Deterministic per seed; split into train/dev/test by video; one manifest per split, plus the
evaluation suites' sets (`EVAL_SETS`) drawn from the test videos.  It is the
embedded default for everything downstream: a policy that sees colour, shape, motion, count and
order better answers measurably better.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vpref.data.manifest import Sample, family_counts, write_manifest
from vpref.data.video import write_video
from vpref.data.world import (COLOURS, FAMILIES, MOTIONS, QUESTION_TEMPLATES, SHAPES, Obj, Scene, caption,
                              question_and_answer)

SPLITS = ("train", "dev", "test")
_VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclass(frozen=True)
class SynthSpec:
    n: int = 400
    seed: int = 0
    size: int = 64
    min_frames: int = 8
    max_frames: int = 16
    fps: int = 8
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)


def position(o: Obj, t: int, scene_frames: int, size: int) -> tuple[float, float]:
    """Centre of object `o` at frame t: it travels a fixed distance between appearing and the end."""
    dx, dy = _VELOCITY[o.motion]
    speed = travel(size) / max(1, scene_frames - 1 - o.appear)
    k = max(0, t - o.appear)
    return o.x + dx * speed * k, o.y + dy * speed * k


def travel(size: int) -> float:
    return 0.35 * size


def radius(size: int) -> float:
    return size * 7 / 64


def _appear_times(rng, n_obj: int, n_frames: int) -> list[int]:
    # Gaps of a quarter of the clip or more, so the order survives uniform frame sampling.
    windows = [(0.0, 0.0), (0.25, 0.4), (0.55, 0.7)]
    return [int(round(n_frames * rng.uniform(*windows[i]))) for i in range(n_obj)]


def sample_scene(rng: np.random.Generator, spec: SynthSpec) -> Scene:
    size, r = spec.size, radius(spec.size)
    n_frames = int(rng.integers(spec.min_frames, spec.max_frames + 1))
    for _ in range(1000):
        n_obj = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
        colours = rng.choice(list(COLOURS), n_obj, replace=False)
        shapes = rng.choice(SHAPES, n_obj, replace=False)
        motions = rng.choice(MOTIONS, n_obj)
        appear = _appear_times(rng, n_obj, n_frames)
        objs = []
        for c, s, m, a in zip(colours, shapes, motions, appear):
            dx, dy = _VELOCITY[m]
            lo, hi = r + 1, size - r - 1
            # Choose a start so that the whole path stays inside the frame.
            x0 = rng.uniform(lo - min(0, dx) * travel(size), hi - max(0, dx) * travel(size))
            y0 = rng.uniform(lo - min(0, dy) * travel(size), hi - max(0, dy) * travel(size))
            objs.append(Obj(str(c), str(s), str(m), a, float(x0), float(y0)))
        scene = Scene(tuple(objs), n_frames, size, spec.fps)
        if _separated(scene):
            return scene
    raise RuntimeError("could not place shapes without overlap; use a larger --size")


def _separated(scene: Scene) -> bool:
    r = radius(scene.size)
    for t in range(scene.num_frames):
        pts = [position(o, t, scene.num_frames, scene.size) for o in scene.objects if t >= o.appear]
        for i in range(len(pts)):
            for j in range(i + 1, len(pts)):
                if math.dist(pts[i], pts[j]) < 2 * r + 3:
                    return False
    return True


def render(scene: Scene, background: tuple[int, int, int] = (123, 117, 104)) -> np.ndarray:
    """uint8 frames (T, H, W, 3) of the scene."""
    size, r = scene.size, radius(scene.size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    frames = np.empty((scene.num_frames, size, size, 3), np.uint8)
    for t in range(scene.num_frames):
        f = np.empty((size, size, 3), np.uint8)
        f[:] = background
        for o in scene.objects:
            if t < o.appear:
                continue
            cx, cy = position(o, t, scene.num_frames, size)
            dx, dy = xx - cx, yy - cy
            if o.shape == "circle":
                mask = dx * dx + dy * dy <= r * r
            elif o.shape == "square":
                h = r * 0.85  # similar area to the circle
                mask = (np.abs(dx) <= h) & (np.abs(dy) <= h)
            else:  # triangle pointing up
                mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
            f[mask] = COLOURS[o.colour]
        frames[t] = f
    return frames


def make_samples(scene: Scene, video_id: str, video_path: Path, split: str, rng) -> list[Sample]:
    """One question per family (order only with two or more shapes), paraphrase chosen at random."""
    cap = caption(scene)
    out = []
    for family in FAMILIES:
        if family == "order" and len(scene.objects) < 2:
            continue
        target = int(rng.integers(len(scene.objects)))
        template = int(rng.integers(2))
        q, a = question_and_answer(scene, family, target, template)
        meta = {
            "family": family,
            "video_id": video_id,
            "split": split,
            "target": target,
            "template": template,
            "n_objects": len(scene.objects),
        }
        out.append(Sample(f"{video_id}-{family}", str(video_path), q, a, cap, meta))
    return out


# The evaluation suites' sets, written from the test split's videos (file stem -> families):
# Video-ChatGPT's generic (dimensions 1-3), temporal (4) and consistency (5) sets, and a
# short-answer zero-shot QA set.  Their questions are the test split's own, so an evaluation that
# answers the test split answers them too; only consistency's second wording is new.
EVAL_SETS = {
    "vcgpt_generic": ("describe",),
    "vcgpt_temporal": ("order", "direction"),
    "vcgpt_consistency": FAMILIES,
    "zeroshot_qa": tuple(f for f in FAMILIES if f != "describe"),
}


def make_eval_samples(scene: Scene, video_id: str, samples: list[Sample], rng) -> dict[str, list[Sample]]:
    """One video's items of each evaluation set.  `rng` is its own stream: drawing from it leaves
    the train/dev/test manifests exactly as they were."""
    by_family = {s.family: s for s in samples}
    out: dict[str, list[Sample]] = {name: [] for name in EVAL_SETS}
    for name, fams in EVAL_SETS.items():
        if name == "vcgpt_consistency":
            continue
        for fam in fams:
            if fam in by_family:
                s = by_family[fam]
                tag = name.split("_")[1]
                out[name].append(Sample(f"{video_id}-{tag}-{fam}", s.video, s.question, s.answer, s.caption,
                                        {**s.meta, "set": name}))
    # consistency: the test question and the same question in its other wording, one answer
    fams = [f for f in FAMILIES if f in by_family]
    s = by_family[fams[int(rng.integers(len(fams)))]]
    o = scene.objects[s.meta["target"]]
    other = 1 - s.meta["template"]
    q2 = QUESTION_TEMPLATES[s.family][other].format(shape=o.shape, colour=o.colour, name=o.name)
    out["vcgpt_consistency"].append(Sample(f"{video_id}-consistency-{s.family}", s.video, s.question, s.answer,
                                           s.caption, {**s.meta, "set": "vcgpt_consistency", "question2": q2,
                                                       "template2": other}))
    return out


def split_of(i: int, order: np.ndarray, fractions) -> str:
    n = len(order)
    n_train = int(round(fractions[0] * n))
    n_dev = int(round(fractions[1] * n))
    rank = int(order[i])
    return "train" if rank < n_train else ("dev" if rank < n_train + n_dev else "test")


def synthesize(out: str | Path, spec: SynthSpec, progress=None) -> dict:
    """Write videos, scenes and one manifest per split under `out`; returns a summary."""
    t0 = time.perf_counter()
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng([spec.seed, 1]).permutation(spec.n)
    by_split: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    eval_sets: dict[str, list[Sample]] = {name: [] for name in EVAL_SETS}
    scenes = {}
    for i in range(spec.n):
        rng = np.random.default_rng([spec.seed, 0, i])
        scene = sample_scene(rng, spec)
        vid = f"v{spec.seed}-{i:05d}"
        path = out / "videos" / f"{vid}.mp4"
        write_video(path, render(scene), fps=spec.fps)
        split = split_of(i, order, spec.split)
        samples = make_samples(scene, vid, path, split, rng)
        by_split[split] += samples
        if split == "test":
            for name, items in make_eval_samples(scene, vid, samples, np.random.default_rng([spec.seed, 2, i])).items():
                eval_sets[name] += items
        scenes[vid] = asdict(scene)
        if progress:
            progress(i + 1, spec.n)
    for split, samples in by_split.items():
        write_manifest(out / f"{split}.jsonl", samples)
    for name, samples in eval_sets.items():
        write_manifest(out / f"{name}.jsonl", samples)
    (out / "scenes.json").write_text(json.dumps(scenes))
    summary = {
        "out": str(out),
        "spec": asdict(spec),
        "videos": {s: len({x.meta["video_id"] for x in v}) for s, v in by_split.items()},
        "questions": {s: family_counts(v) for s, v in by_split.items()},
        "eval_sets": {name: family_counts(v) for name, v in eval_sets.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "synth.json").write_text(json.dumps(summary, indent=2))
    return summary
