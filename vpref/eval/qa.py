"""Answering a split's questions with a policy, and exact-match accuracy per question family."""

from __future__ import annotations

from collections import defaultdict

from vpref.config import SamplingConfig
from vpref.data.manifest import Sample
from vpref.data.world import FAMILIES, is_correct
from vpref.models.generation import Completion, generate


def answer_all(vlm, samples: list[Sample], clips: dict, batch_size: int = 32, max_new_tokens: int = 48,
               sampling: SamplingConfig | None = None) -> list[Completion]:
    """One completion per sample (greedy unless `sampling` says otherwise)."""
    sampling = sampling or SamplingConfig(temperature=0.0, n=1, max_new_tokens=max_new_tokens)
    out: list[Completion] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        got = generate(
            vlm,
            [clips[s.video].frames for s in chunk],
            [s.question for s in chunk],
            sampling,
            fps=[clips[s.video].sampled_fps for s in chunk],
            seed=sampling.seed + i,
        )
        out += [c[0] for c in got]
    return out


def accuracy_by_family(samples: list[Sample], answers: list[str]) -> dict[str, float]:
    """Exact-match accuracy per family (the value the family asks for), plus 'all' and 'qa'
    (every family but describe)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, a in zip(samples, answers):
        if s.answer is None or s.family not in FAMILIES:
            continue
        ok = is_correct(s.family, a, s.answer)
        hits[s.family].append(ok)
        hits["all"].append(ok)
        if s.family != "describe":
            hits["qa"].append(ok)
    order = [f for f in FAMILIES if f in hits] + [k for k in ("qa", "all") if k in hits]
    return {k: sum(hits[k]) / len(hits[k]) for k in order}
