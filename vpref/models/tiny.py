"""Tiny random-weight video-LLM checkpoints of every family, built locally (no model hub).

`build_tiny` trains (or reuses) a byte-level BPE tokenizer on the synthetic world's language (plus
the judge rubrics), creates a model of a few million parameters of the family asked for
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video, InternVL), and saves model,
tokenizer, chat template and processor with `save_pretrained`: `processor_config.json` names the
genuine processor classes, so the folder loads through exactly the path a real checkpoint of the
family takes (`VideoLM.load` here, `AutoProcessor` + vLLM where torchvision is installed).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np

from vpref.models.families.base import TINY_SIZES  # noqa: F401 (re-exported: the sizes vpref sft offers)

# Every family's multimodal tokens are in the one shared vocabulary; each family's tokenizer
# names the ones its processor reads (`tokenizer.video_token`, ...).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
]


def chat_template(video_part: str, image_part: str = "<image>") -> str:
    """The tiny checkpoints' turn format (Qwen's; SmolLM2 and InternVL use the same), with a
    family's placeholder for video parts.  Content may be a string or a list of parts."""
    return (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'video' %}}{video_part}"
        f"{{% elif part['type'] == 'image' %}}{image_part}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}"
        "{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# Qwen2.5-VL's turn format; a video part becomes <|vision_start|><|video_pad|><|vision_end|>.
CHAT_TEMPLATE = chat_template("<|vision_start|><|video_pad|><|vision_end|>",
                              "<|vision_start|><|image_pad|><|vision_end|>")


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
    texts += ["\n".join(f"Frame{i}: " for i in range(1, 17))] * 20  # InternVL's per-frame labels
    return texts


def rubric_corpus() -> list[str]:
    from vpref.judges.rubric import all_template_texts

    return all_template_texts()


def train_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer (any text encodes; the corpus' words become single tokens),
    named for Qwen2.5-VL; `family_tokenizer` re-names it for another family."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    return family_tokenizer(tok, "qwen2_5_vl")


def family_tokenizer(tokenizer, family: str):
    """The shared vocabulary as a family's tokenizer: its named multimodal tokens (the processor
    reads `tokenizer.video_token`, InternVL also `start_image_token`, ...) and chat template."""
    from transformers import PreTrainedTokenizerFast

    from vpref.models.families import get_family

    fam = get_family(family)
    backend = copy.deepcopy(getattr(tokenizer, "backend_tokenizer", tokenizer))  # one per tokenizer object
    image = "<|vision_start|><|image_pad|><|vision_end|>" if "<|image_pad|>" in fam.tokens.values() else "<image>"
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=None, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", extra_special_tokens=SPECIAL_TOKENS[1:], **fam.tokens)
    hf.chat_template = chat_template(fam.template_video, image)
    hf.padding_side = "left"
    return hf


def tiny_config(tokenizer, size: str = "1m", family: str = "qwen2_5_vl"):
    """The model config of a tiny checkpoint of `family`."""
    from vpref.models.families import get_family

    return get_family(family).tiny_config(family_tokenizer(tokenizer, family), size)


def tiny_parts(tokenizer, family: str = "qwen2_5_vl", size: str = "1m", seed: int = 0, config=None):
    """(model, processor) of a random tiny checkpoint; `config` overrides the family's tiny one."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from vpref.models.families import get_family

    fam = get_family(family)
    tok = family_tokenizer(tokenizer, family)
    config = config or fam.tiny_config(tok, size)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               do_sample=False)
    return model, fam.tiny_processor(tok, config)


def build_tiny(out_dir: str | Path, size: str = "1m", seed: int = 0, tokenizer=None, vocab_size: int = 1024,
               family: str = "qwen2_5_vl") -> Path:
    """Create and save a random-weight tiny checkpoint of `family`; returns the folder.

    Pass `tokenizer` to share one vocabulary across several zoo members (of any families).
    """
    from vpref.models.video_processors import save_processor

    out = Path(out_dir)
    if tokenizer is None:
        tokenizer = train_tokenizer(world_corpus() + rubric_corpus(), vocab_size)
    model, processor = tiny_parts(tokenizer, family, size, seed)
    model.save_pretrained(out)
    save_processor(processor, out)
    return out
