"""The one scoring seam under every LLM judge back end.

    given this prompt (the user turn), this start of the assistant's reply (the prefill) and
    these candidate continuations (labels), how likely is each label?

Every engine (HF `ChatLM`, vLLM `VLLMChat`, an OpenAI-compatible endpoint) answers it with
`label_logprobs(queries) -> list[LabelScores]`; rubric scores, pairwise verdicts and evaluation
templates (a prefill such as ``{'score': `` with labels "0".."5") are all built on it.

How a label's probability is computed (teacher-forced engines):

* Each candidate is tokenised *in context*: the whole string chat-prompt + prefill + label is
  tokenised at once, so a tokeniser that merges the prefill's trailing space into the label
  ("answer: A" -> ``['answer', ':', 'ĠA']``) or splits a label ("10" -> ``['1', '0']``) is
  handled; no label is assumed to be one token.  All labels of a query are scored from one
  common start position (the first token some label changes), so their probabilities are of the
  same event: "the reply continues with this text".
* log p(label) = sum of its tokens' log-probs (teacher forcing).
* Terminator: p(label is the whole answer) = p(label's tokens) - p(the labels that extend it
  token by token).  So "1" does not take the mass of "10" on a 1-10 scale.
* The label mass is the sum over labels; the distribution is renormalised over the labels.  A
  query whose mass is below the judge's threshold is an explicit failure, never a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LabelQuery:
    prompt: str  # the user turn
    prefill: str  # the assistant's reply so far; the label continues it
    labels: tuple[str, ...]
    tag: str = ""  # what the prompt was rendered from (a rubric version): part of the endpoint cache key

    def __post_init__(self):
        if not self.labels or any(not lbl for lbl in self.labels):
            raise ValueError(f"a label query needs non-empty labels, got {self.labels!r}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels!r}")


@dataclass(frozen=True)
class Chain:
    """A reply read label by label: step k is (text before its label, labels).  The prefill of step
    k is everything before it with each earlier step's most likely label filled in, i.e. what a
    greedy judge would have written (rubric aspects: "Relevance: " 4 "\\nAccuracy: " ...)."""

    prompt: str
    steps: tuple[tuple[str, tuple[str, ...]], ...]
    tag: str = ""


@dataclass
class Usage:
    """What a query cost at an endpoint (zero for local engines)."""

    requests: int = 0  # requests sent (cache hits excluded)
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: "Usage") -> "Usage":
        return Usage(self.requests + other.requests, self.cache_hits + other.cache_hits,
                     self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens,
                     self.cost_usd + other.cost_usd)


@dataclass
class LabelScores:
    """An engine's answer to one query: p(label is the whole answer), not renormalised.  A label the
    engine could not see (outside an endpoint's top-k) has p = 0, and the mass check catches it."""

    probs: dict[str, float]
    path: str = "logprobs"  # logprobs: read from the model's distribution; text: parsed from a reply
    error: str | None = None  # the query could not be scored at all (the endpoint failed)
    failure: str = ""  # one word for the error: endpoint | circuit_open | unparsed
    raw: str | None = None  # the reply text, where there was one
    usage: Usage = field(default_factory=Usage)


@dataclass
class LabelDist:
    """A label distribution ready for a judgment."""

    labels: tuple[str, ...]
    probs: dict[str, float]  # renormalised over the labels (empty when nothing was seen)
    mass: float  # sum of p(label) before renormalising
    ok: bool
    path: str
    error: str | None = None
    failure: str = ""  # low_mass | unparsed | endpoint | circuit_open
    raw: str | None = None
    usage: Usage = field(default_factory=Usage)

    @property
    def mode(self) -> str | None:
        return max(self.labels, key=lambda lbl: self.probs.get(lbl, 0.0)) if self.probs else None

    @property
    def expected(self) -> float | None:
        """sum_l p(l) * l over numeric labels (G-Eval's score); None for non-numeric labels."""
        try:
            values = {lbl: float(lbl) for lbl in self.labels}
        except ValueError:
            return None
        return sum(p * values[lbl] for lbl, p in self.probs.items()) if self.probs else None


def to_distribution(scores: LabelScores, labels: tuple[str, ...], min_mass: float = 0.0) -> LabelDist:
    base = dict(labels=tuple(labels), path=scores.path, raw=scores.raw, usage=scores.usage)
    if scores.error is not None:
        return LabelDist(probs={}, mass=0.0, ok=False, error=scores.error, failure=scores.failure or "endpoint", **base)
    mass = float(sum(max(0.0, scores.probs.get(lbl, 0.0)) for lbl in labels))
    if mass <= 0.0:
        why = "no probability on any label" if scores.path == "logprobs" else "no label in the reply"
        return LabelDist(probs={}, mass=0.0, ok=False, error=f"{why} ({', '.join(labels)})",
                         failure="low_mass" if scores.path == "logprobs" else "unparsed", **base)
    probs = {lbl: max(0.0, scores.probs.get(lbl, 0.0)) / mass for lbl in labels}
    if mass < min_mass:
        return LabelDist(probs=probs, mass=mass, ok=False, failure="low_mass",
                         error=f"label mass {mass:.3f} is below judge.min_label_mass {min_mass:g}", **base)
    return LabelDist(probs=probs, mass=mass, ok=True, **base)


def label_distributions(engine, queries: list[LabelQuery], min_mass: float = 0.0) -> list[LabelDist]:
    """The label distribution of every query (batched in the engine): the generic entry point for
    rubric aspects, verdicts and evaluation templates alike."""
    if not queries:
        return []
    return [to_distribution(s, q.labels, min_mass) for q, s in zip(queries, engine.label_logprobs(queries))]


def label_chains(engine, chains: list[Chain], min_mass: float = 0.0) -> list[list[LabelDist]]:
    """Read each chain step by step.  An engine may answer a whole chain at once (an endpoint reads
    every step along one greedy reply); otherwise steps run one after another, batched across chains,
    each prefilled with the earlier steps' most likely labels."""
    if hasattr(engine, "label_chains"):
        return engine.label_chains(chains, min_mass)
    return sequential_chains(engine, chains, min_mass)


def sequential_chains(engine, chains: list[Chain], min_mass: float = 0.0,
                      start: list[tuple[str, list[LabelDist]]] | None = None) -> list[list[LabelDist]]:
    """Steps one after another; `start` resumes each chain from (reply so far, its first steps)."""
    replies = [s[0] for s in start] if start else [""] * len(chains)
    out: list[list[LabelDist]] = [list(s[1]) for s in start] if start else [[] for _ in chains]
    alive = {i for i, o in enumerate(out) if all(d.mode is not None for d in o)}
    for k in range(max((len(c.steps) for c in chains), default=0)):
        todo = [i for i in sorted(alive) if len(out[i]) == k < len(chains[i].steps)]
        queries = [LabelQuery(chains[i].prompt, replies[i] + chains[i].steps[k][0], chains[i].steps[k][1],
                              chains[i].tag) for i in todo]
        for i, q, d in zip(todo, queries, label_distributions(engine, queries, min_mass)):
            out[i].append(d)
            if d.mode is None:  # nothing to continue the reply with: the later steps cannot be asked
                alive.discard(i)
            else:
                replies[i] = q.prefill + d.mode
    for i, c in enumerate(chains):  # steps after one that had no label at all
        while len(out[i]) < len(c.steps):
            out[i].append(LabelDist(c.steps[len(out[i])][1], {}, 0.0, False, out[i][-1].path if out[i] else "logprobs",
                                    error="not asked: an earlier step had no label", failure="unparsed"))
    return out


# --------------------------------------------------------------------------- tokenisation in context


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def candidate_ids(encode, context: str, labels) -> tuple[list[list[int]], int]:
    """Token ids of context + label for every label (each whole string tokenised at once) and the
    common start: the first position where some label's tokens differ from the context's own."""
    base = encode(context)
    full = [list(encode(context + lbl)) for lbl in labels]
    start = min(common_prefix(base, f) for f in full)
    if start < 1:
        raise ValueError("a candidate must follow at least one context token (empty prompt?)")
    for lbl, f in zip(labels, full):
        if len(f) <= start:
            raise ValueError(f"label {lbl!r} adds no token after the context")
    return full, start


def complete_probs(full: list[list[int]], start: int, token_logprobs: list[list[float]]) -> list[float]:
    """p(label is the whole answer) from its tokens' log-probs: p(tokens) minus the probability of
    the labels whose tokens extend it (its nearest extensions; they are disjoint events)."""
    reach = [math.exp(sum(lps)) for lps in token_logprobs]
    seqs = [tuple(f[start:]) for f in full]
    out = []
    for i, s in enumerate(seqs):
        ext = [j for j, t in enumerate(seqs) if len(t) > len(s) and t[:len(s)] == s]
        nearest = [j for j in ext if not any(k != j and len(seqs[k]) < len(seqs[j])
                                             and seqs[j][:len(seqs[k])] == seqs[k] for k in ext)]
        out.append(max(0.0, reach[i] - sum(reach[j] for j in nearest)))
    return out


def plan_rows(full: list[list[int]], start: int) -> tuple[list[list[int]], list[int]]:
    """The fewest sequences to run so that every candidate token gets its log-prob: candidate i
    needs the logits at positions start-1 .. len-2 of full[i][:-1], and a sequence that is a prefix
    of another is covered by it (causal attention).  Returns (rows, row of each candidate)."""
    needs = [f[:-1] for f in full]
    order = sorted(range(len(full)), key=lambda i: -len(needs[i]))
    rows: list[list[int]] = []
    which = [0] * len(full)
    for i in order:
        for r, row in enumerate(rows):
            if row[:len(needs[i])] == needs[i]:
                which[i] = r
                break
        else:
            which[i] = len(rows)
            rows.append(needs[i])
    return rows, which
