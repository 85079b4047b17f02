"""The judge interface: `score(sample, responses) -> judgments` and, for pairwise checks,
`compare(sample, first, second) -> verdict` (run in both orders)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vpref.data.schema import Judgment, Verdict


@dataclass(frozen=True)
class SampleView:
    """What a judge may know about a question: never the frames' truth, only its context."""

    sample_id: str
    question: str
    answer: str | None  # reference answer, when the manifest has one
    caption: str | None  # detailed description of the video (the judge's context)
    family: str | None = None


@dataclass(frozen=True)
class ResponseView:
    response_id: str
    text: str


class Judge(Protocol):
    name: str
    rubric: str
    rubric_version: str

    def score(self, sample: SampleView, responses: list[ResponseView]) -> list[Judgment]: ...

    def compare(self, sample: SampleView, first: ResponseView, second: ResponseView) -> Verdict: ...
