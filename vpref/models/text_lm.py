"""Moved: the HF chat engine of the LLM judges lives in `vpref.judges.engines.hf`."""

from vpref.judges.engines.hf import ChatLM  # noqa: F401
