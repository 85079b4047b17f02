"""A chat model used through text alone: the LLM judge's engine (HF backend).

Any Hugging Face causal LM with a chat template works (SmolLM2, Llama, Qwen2.5), and so does a
checkpoint of any registered video-LLM family (`vpref.models.families`), which then reads the
video through its caption only.
"""

from __future__ import annotations

import torch

from vpref.models.families import SUPPORTED as VIDEO_FAMILIES
from vpref.models.families import get_family, model_type


class ChatLM:
    def __init__(self, model, tokenizer, path: str, kind: str):
        self.model, self.tokenizer, self.path, self.kind = model, tokenizer, str(path), kind
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
                        if isinstance(i, int) and i >= 0]

    @classmethod
    def load(cls, path, dtype: str = "float32", device: str = "cpu") -> "ChatLM":
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        kind = model_type(path)
        auto = AutoModelForImageTextToText if kind in VIDEO_FAMILIES else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        if not tok.chat_template:
            raise ValueError(f"{path}: the tokenizer has no chat template; an LLM judge needs an instruct model")
        return cls(model, tok, path, kind)

    def chat(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> list[str]:
        """One user turn per prompt; the assistant's replies."""
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        if self.kind in VIDEO_FAMILIES and get_family(self.kind).mm_token_types:  # text only: all tokens are text
            enc["mm_token_type_ids"] = torch.zeros_like(enc["input_ids"])
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=0.95)
        else:
            kw.update(do_sample=False)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
