"""The registry of video-LLM families, keyed by the checkpoint's `model_type`.

Adding a family is one small module here (a `Family` subclass: processor classes, a torch-only
video processor, where the vision tower lives, a tiny builder) plus one line in `_MODULES`;
docs/architecture.md walks through it.  Modules are imported on first use, so this file stays
cheap to import (the config validates family names against `SUPPORTED` without torch).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# model_type -> "module:attribute" of its Family instance
_MODULES = {
    "qwen2_vl": "qwen2_vl:QWEN2_VL",
    "qwen2_5_vl": "qwen2_vl:QWEN2_5_VL",
    "qwen3_vl": "qwen3_vl:FAMILY",
    "llava_onevision": "llava_onevision:FAMILY",
    "llava_next_video": "llava_next_video:FAMILY",
    "internvl": "internvl:FAMILY",
}
SUPPORTED = frozenset(_MODULES)


def model_type(path: str | Path) -> str:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    return json.loads(cfg.read_text()).get("model_type", "?")


def get_family(kind: str, where: str | Path | None = None):
    """The Family for a model_type; a clear error naming the supported ones otherwise."""
    if kind not in _MODULES:
        at = f"{where}: " if where is not None else ""
        raise ValueError(f"{at}model_type {kind!r} is not supported yet; supported video LLM families: "
                         f"{sorted(SUPPORTED)} (adding one: docs/architecture.md, 'Adding a model family')")
    module, attr = _MODULES[kind].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


def family_of(path: str | Path):
    """The Family of a checkpoint folder (from its config.json)."""
    return get_family(model_type(path), path)
