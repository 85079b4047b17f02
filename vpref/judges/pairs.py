"""Pair strategies: judged responses of one question -> chosen/rejected candidates.

* best_vs_worst (MMAIP-V, default): the highest-scored answer against the lowest, one pair.
* all_pairs (VLFeedback): every two answers whose overall scores differ; ties dropped.

Both apply the minimum margin and the optional length-bias guard, skip failed judgments, and
never pair two identical texts.  Deterministic: equal scores are broken by response id.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

EPS = 1e-9


@dataclass(frozen=True)
class Candidate:
    response_id: str
    text: str
    overall: float
    num_tokens: int


def _distinct(cands: list[Candidate]) -> list[Candidate]:
    seen, out = set(), []
    for c in sorted(cands, key=lambda c: c.response_id):
        key = c.text.strip()
        if key and key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _keep(chosen: Candidate, rejected: Candidate, min_margin: float, max_length_ratio: float | None) -> bool:
    margin = chosen.overall - rejected.overall
    if margin <= EPS or margin + EPS < min_margin:
        return False
    if max_length_ratio is not None and chosen.num_tokens > max_length_ratio * max(1, rejected.num_tokens):
        return False
    return True


def make_pairs(cands: list[Candidate], strategy: str = "best_vs_worst", min_margin: float = 0.0,
               max_length_ratio: float | None = None) -> list[tuple[Candidate, Candidate]]:
    cands = _distinct(cands)
    if len(cands) < 2:
        return []
    ranked = sorted(cands, key=lambda c: (-c.overall, c.response_id))
    if strategy == "best_vs_worst":
        best, worst = ranked[0], ranked[-1]
        return [(best, worst)] if _keep(best, worst, min_margin, max_length_ratio) else []
    if strategy == "all_pairs":
        return [(a, b) for a, b in combinations(ranked, 2) if _keep(a, b, min_margin, max_length_ratio)]
    raise ValueError(f"unknown pair strategy {strategy!r}; use best_vs_worst or all_pairs")
