"""LLaVA-OneVision: a SigLIP (or CLIP) tower, frames resized to the tower's size ->
`pixel_values_videos` (B, T, 3, S, S); the processor expands `<video>` to T*ceil(p/2)^2 + 1 tokens
(p = S/patch: 2x2 pooling per frame, one newline token per video)."""

from __future__ import annotations

from vpref.models.families.base import FRAME_SIZE, Family, text_config, tiny_size
from vpref.models.video_processors import TorchVideoProcessor


class TorchLlavaOnevisionVideoProcessor(TorchVideoProcessor):
    genuine = "LlavaOnevisionVideoProcessor"
    size = {"height": 384, "width": 384}


class LlavaOnevision(Family):
    model_type = "llava_onevision"
    processor_class = "LlavaOnevisionProcessor"
    image_processor_class = "LlavaOnevisionImageProcessor"
    video_processor = TorchLlavaOnevisionVideoProcessor
    vision_modules = ("model.vision_tower",)
    vision_prefixes = ("vision_tower.", "model.vision_tower.")
    tiny_patch = 16  # 64x64 frames -> 4x4 patches -> 2x2 pooled = 4 tokens a frame

    def tiny_vision(self, size: str) -> dict:
        v_hidden, v_depth, v_heads = tiny_size(size)[5:]
        return dict(model_type="siglip_vision_model", hidden_size=v_hidden, intermediate_size=2 * v_hidden,
                    num_hidden_layers=v_depth, num_attention_heads=v_heads, image_size=FRAME_SIZE,
                    patch_size=self.tiny_patch, vision_use_head=False)

    def tiny_config(self, tokenizer, size, text: dict | None = None):
        """`text`: the language model's config (default: a tiny random Qwen2); SmolLM2's for the
        pretrained-text zoo member."""
        from transformers import LlavaOnevisionConfig

        tid = tokenizer.convert_tokens_to_ids
        return LlavaOnevisionConfig(
            text_config=text or text_config(tokenizer, size, "qwen2"), vision_config=self.tiny_vision(size),
            image_token_index=tid("<image>"), video_token_index=tid("<video>"), vision_feature_layer=-1,
            vision_feature_select_strategy="full", image_grid_pinpoints=[[FRAME_SIZE, FRAME_SIZE]],
            tie_word_embeddings=True)

    def tiny_processor(self, tokenizer, config):
        from transformers import LlavaOnevisionProcessor

        s = config.vision_config.image_size
        return LlavaOnevisionProcessor(
            image_processor=self.tiny_image_processor(size={"height": s, "width": s}, image_grid_pinpoints=[[s, s]]),
            tokenizer=tokenizer, video_processor=self.video_processor(size={"height": s, "width": s}),
            num_image_tokens=(s // config.vision_config.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            chat_template=tokenizer.chat_template)


FAMILY = LlavaOnevision()
