"""Tiny random-weight Qwen2.5-VL checkpoints, built locally (no model hub).

`build_tiny` trains a byte-level BPE tokenizer on the synthetic world's language (plus the
judge rubrics), creates a Qwen2.5-VL of a few million parameters, and saves model, tokenizer,
chat template and video preprocessor with `save_pretrained`, so the result loads through
exactly the path a real Qwen2.5-VL checkpoint takes (`vpref.models.load_video_lm`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's turn format; a video part becomes <|vision_start|><|video_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# name -> (text hidden, layers, heads, kv heads, mlp, vision hidden, vision depth, vision heads)
TINY_SIZES = {
    "0.2m": (64, 2, 2, 1, 128, 32, 1, 1),
    "1m": (128, 4, 4, 2, 256, 64, 2, 2),
    "3m": (256, 4, 4, 2, 512, 128, 2, 2),
    "5m": (256, 6, 4, 2, 768, 128, 4, 2),
}


def world_corpus(n_scenes: int = 400, seed: int = 0) -> list[str]:
    """Every kind of sentence the synthetic world uses: questions, answers, captions."""
    from vpref.data.synth import SynthSpec, sample_scene
    from vpref.data.world import FAMILIES, QUESTION_TEMPLATES, question_and_answer

    rng = np.random.default_rng(seed)
    spec = SynthSpec()
    texts = []
    for _ in range(n_scenes):
        scene = sample_scene(rng, spec)
        for family, target, tpl in itertools.product(FAMILIES, range(len(scene.objects)), range(2)):
            q, a = question_and_answer(scene, family, target, tpl)
            texts += [q, a]
    texts += [t for tpls in QUESTION_TEMPLATES.values() for t in tpls]
    texts += ["system\nuser\nassistant\n"] * 50  # chat-template role names become single tokens
    return texts


def rubric_corpus() -> list[str]:
    from vpref.judges.rubric import all_template_texts

    return all_template_texts()


def train_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer (any text encodes; the corpus' words become single tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf


def tiny_config(tokenizer, size: str = "1m"):
    from transformers import Qwen2_5_VLConfig

    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny size {size!r}; choose one of {sorted(TINY_SIZES)}")
    hidden, layers, heads, kv, mlp, v_hidden, v_depth, v_heads = TINY_SIZES[size]
    half = hidden // heads // 2  # M-RoPE sections must sum to head_dim / 2 (Qwen's 16:24:24 shape)
    mrope = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    tid = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=4096,
            bos_token_id=tid("<|endoftext|>"),
            eos_token_id=tid("<|im_end|>"),
            pad_token_id=tid("<|endoftext|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        ),
        vision_config=dict(
            depth=v_depth,
            hidden_size=v_hidden,
            intermediate_size=2 * v_hidden,
            num_heads=v_heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=hidden,
            window_size=56,
            fullatt_block_indexes=[v_depth - 1],
            tokens_per_second=2,
        ),
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_tiny(out_dir: str | Path, size: str = "1m", seed: int = 0, tokenizer=None, vocab_size: int = 1024) -> Path:
    """Create and save a random-weight tiny Qwen2.5-VL; returns the checkpoint folder.

    Pass `tokenizer` to share one vocabulary across several zoo members.
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from vpref.models.processor import VideoPreprocessor

    out = Path(out_dir)
    if tokenizer is None:
        tokenizer = train_tokenizer(world_corpus() + rubric_corpus(), vocab_size)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, size))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # 64x64 synthetic frames -> 56x56 -> 4 merged tokens per pair of frames.
    VideoPreprocessor(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(out)
    return out
