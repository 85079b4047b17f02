"""What a video-LLM family module provides, and the parts every family shares.

A family is the small amount of knowledge that differs between video LLMs once transformers'
own processor does the prompt expansion: which processor and image-processor classes to build,
which torch-only video processor stands in for the torchvision one, where the vision tower
lives (freezing it, skipping it on reloads), what vLLM needs besides the frames, and how to build
a tiny random checkpoint of it.  Generation, DPO scoring, reloads and vLLM prompts are then the
same code for every family (`vpref.models.video_lm.VideoLM`, `vpref.actors.vllm_backend`).
"""

from __future__ import annotations

from pathlib import Path

# name -> (text hidden, layers, heads, kv heads, mlp, vision hidden, vision depth, vision heads)
TINY_SIZES = {
    "0.2m": (64, 2, 2, 1, 128, 32, 1, 1),
    "1m": (128, 4, 4, 2, 256, 64, 2, 2),
    "3m": (256, 4, 4, 2, 512, 128, 2, 2),
    "5m": (256, 6, 4, 2, 768, 128, 4, 2),
}
FRAME_SIZE = 64  # the synthetic world's frames; tiny vision towers see them at this size
VIDEO_PLACEHOLDER = "<video>"  # what LLaVA-style chat templates write for a video part


def tiny_size(size: str) -> tuple[int, ...]:
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny size {size!r}; choose one of {sorted(TINY_SIZES)}")
    return TINY_SIZES[size]


def text_config(tokenizer, size: str, model_type: str | None = None, **extra) -> dict:
    """The language model of a tiny checkpoint (model_type: any HF decoder, e.g. qwen2 or llama;
    None: the one the composite config defaults to)."""
    hidden, layers, heads, kv, mlp = tiny_size(size)[:5]
    tid = tokenizer.convert_tokens_to_ids
    cfg = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
               bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"),
               **extra)
    if model_type:
        cfg["model_type"] = model_type
    return cfg


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class Family:
    """One video-LLM family.  Subclasses (one small module each) set the class attributes and,
    where their family needs it, override a hook."""

    model_type = ""  # config.json's model_type (the registry key)
    processor_class = ""  # transformers processor class name
    image_processor_class = ""  # genuine image processor name; its "...Pil" twin runs without torchvision
    video_processor = None  # torch-only VideoProcessorMixin subclass (vpref.models.video_processors)
    vision_modules: tuple[str, ...] = ("model.visual",)  # attribute path(s) of the vision tower in the model
    vision_prefixes: tuple[str, ...] = ("visual.", "model.visual.")  # its tensors' names in checkpoint files
    vllm_video = True  # vLLM takes `multi_modal_data={"video": ...}` for this family
    mm_token_types = False  # the model's forward places vision tokens by `mm_token_type_ids` (Qwen, transformers 5)
    # Tiny builders: the chat template's video part and the named tokens the processor reads
    # from the tokenizer (`tokenizer.video_token`, ...).
    template_video = VIDEO_PLACEHOLDER
    tokens: dict[str, str] = {"image_token": "<image>", "video_token": VIDEO_PLACEHOLDER}

    # ------------------------------------------------------------------ loading

    def image_processor_type(self):
        import transformers

        return getattr(transformers, self.image_processor_class + "Pil", None) or getattr(
            transformers, self.image_processor_class)

    def load_processor(self, path: str | Path, genuine: bool | None = None):
        """transformers' processor for the checkpoint: the genuine one where torchvision works, else
        the same processor class around the torch-only video processor and the PIL image processor.
        `genuine`: force one or the other (None: the genuine one where it can run)."""
        import transformers

        from vpref.models.video_processors import export_video_processor_mixin, torchvision_works

        export_video_processor_mixin()
        if genuine if genuine is not None else torchvision_works():
            processor = transformers.AutoProcessor.from_pretrained(path)
        else:
            cls = getattr(transformers, self.processor_class)
            parts = {"tokenizer": transformers.AutoTokenizer.from_pretrained(path),
                     "image_processor": self.image_processor_type().from_pretrained(path),
                     "video_processor": self.video_processor.from_pretrained(path)}
            processor_dict, _ = cls.get_processor_dict(path)
            processor = cls.from_args_and_dict([parts[a] for a in cls.get_attributes()], processor_dict)
        if not processor.chat_template:  # older checkpoints keep it with the tokenizer only
            processor.chat_template = processor.tokenizer.chat_template
        if not processor.chat_template:
            raise ValueError(f"{path}: no chat template (chat_template.jinja/.json or the tokenizer's)")
        return processor

    def vision_tower(self, model):
        """The vision encoder module (for freeze_vision); through DDP/peft wrappers too."""
        for root in (model, getattr(model, "module", None), _get(model, "base_model.model")):
            for path in self.vision_modules:
                found = _get(root, path) if root is not None else None
                if found is not None:
                    return found
        raise ValueError(f"{type(model).__name__}: no vision tower at {self.vision_modules} ({self.model_type})")

    # ------------------------------------------------------------------ vLLM

    def vllm_engine_mm_kwargs(self, path: str | Path) -> dict | None:
        """Engine-level `mm_processor_kwargs` (None: the checkpoint's processor config is enough)."""
        return None

    def vllm_prompt_mm_kwargs(self, path: str | Path, num_frames: int) -> dict | None:
        """Per-prompt `mm_processor_kwargs` (None: none)."""
        return None

    # ------------------------------------------------------------------ tiny checkpoints

    def tiny_config(self, tokenizer, size: str):
        raise NotImplementedError(f"{self.model_type}: no tiny builder")

    def tiny_processor(self, tokenizer, config):
        raise NotImplementedError(f"{self.model_type}: no tiny builder")

    def tiny_image_processor(self, **kw):
        """The image processor a tiny checkpoint saves (its genuine name is written on save)."""
        return self.image_processor_type()(**kw)
