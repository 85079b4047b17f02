"""Rubrics: judge prompts kept as Jinja2 template files (vpref/judges/rubrics/*.j2).

Each rubric names its aspects and scale; its version is a hash of the template text, so every
judgment records exactly which prompt produced it.  A distributional judge reads the reply the
template asks for ("Relevance: 4\nAccuracy: 2 ...") label by label: `Rubric.steps()` gives, per
aspect, the text before its score and the score labels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

RUBRIC_DIR = Path(__file__).parent / "rubrics"

# rubric name -> aspects, in the order the template asks for them
ASPECTS = {
    "mmaipv": ("relevance", "accuracy", "clarity"),
    "vlfeedback": ("helpfulness", "faithfulness", "ethics"),
    "vlmrlaif": ("accurate", "helpful", "natural", "concise"),
}
SCALE = (1, 5)
PAIRWISE_PREFILL = "Winner: "  # pairwise.j2's reply starts so; its labels are the two positions
PAIRWISE_LABELS = ("A", "B")
RATIONALE_HEADER = "\nRationale: "  # asked after the scores, never before them

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(RUBRIC_DIR),
    undefined=jinja2.StrictUndefined,  # a missing variable is a bug, not an empty string
    keep_trailing_newline=False,
)


@dataclass(frozen=True)
class Rubric:
    name: str
    aspects: tuple[str, ...]
    version: str
    scale: tuple[int, int] = SCALE

    def render(self, *, question: str, response: str, context: str, reference: str | None = None) -> str:
        return _env.get_template(f"{self.name}.j2").render(
            question=question, response=response, context=context, reference=reference
        ).strip()

    @property
    def labels(self) -> tuple[str, ...]:
        lo, hi = self.scale
        return tuple(str(i) for i in range(lo, hi + 1))

    def steps(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(text before the score, score labels) per aspect, in the order the reply gives them."""
        return tuple((("" if i == 0 else "\n") + f"{a.capitalize()}: ", self.labels)
                     for i, a in enumerate(self.aspects))


def _version(name: str) -> str:
    return hashlib.sha1((RUBRIC_DIR / f"{name}.j2").read_bytes()).hexdigest()[:10]


@lru_cache(maxsize=None)
def load_rubric(name: str) -> Rubric:
    if name not in ASPECTS:
        raise ValueError(f"unknown rubric {name!r}; known rubrics: {sorted(ASPECTS)}")
    return Rubric(name, ASPECTS[name], f"{name}@{_version(name)}")


def render_pairwise(rubric: Rubric, *, question, response_a, response_b, context, reference=None) -> str:
    return _env.get_template("pairwise.j2").render(
        question=question, response_a=response_a, response_b=response_b, context=context,
        reference=reference, aspects=rubric.aspects,
    ).strip()


def pairwise_version() -> str:
    return f"pairwise@{_version('pairwise')}"


def caption_instruction() -> str:
    return _env.get_template("caption.j2").render().strip()


def all_template_texts() -> list[str]:
    """The raw template texts (the tiny tokenizer learns their words)."""
    return [p.read_text() for p in sorted(RUBRIC_DIR.glob("*.j2"))]
