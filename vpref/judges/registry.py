"""Judge kinds: one registry, one module per kind.

A kind's module defines

    build(cfg: JudgeConfig, actor: str = "") -> Judge      # the judge, its model loaded
    identity(cfg: JudgeConfig) -> (name, rubric, version)  # the same names, nothing loaded

and the `Judge` protocol of `vpref.judges.base` (`score`, `compare`, `name`, `rubric`,
`rubric_version`).  Adding a kind is one module plus one line here (and its config keys in
`JudgeConfig`); `judge.kind` is checked against this table, and `vpref judge-eval` measures any
kind the same way.
"""

from __future__ import annotations

import importlib

JUDGE_KINDS: dict[str, str] = {
    "reference": "vpref.judges.reference",  # deterministic rubric judge of the synthetic world
    "llm": "vpref.judges.llm",  # a language model on a rubric (distributional; free text as fallback)
    "grounding": "vpref.judges.grounding",  # caption-conditioned likelihood (PMI per token) of any causal LM
    "reward_model": "vpref.judges.reward_model",  # a Bradley-Terry reward model trained by `vpref train-rm`
}


def kind_module(kind: str):
    if kind not in JUDGE_KINDS:
        raise ValueError(f"unknown judge kind {kind!r}; known kinds: {', '.join(JUDGE_KINDS)}")
    return importlib.import_module(JUDGE_KINDS[kind])


def _judge_cfg(cfg):
    return getattr(cfg, "judge", cfg)  # a whole Config or its JudgeConfig


def make_judge(cfg, actor: str = ""):
    """The judge a config asks for, ready to score."""
    cfg = _judge_cfg(cfg)
    return kind_module(cfg.kind).build(cfg, actor)


def judge_identity(cfg) -> tuple[str, str, str]:
    """(judge name, rubric, rubric version) without loading the judge's model."""
    cfg = _judge_cfg(cfg)
    return kind_module(cfg.kind).identity(cfg)
