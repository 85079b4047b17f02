"""LLaVA-NeXT-Video: a CLIP tower; frames resized on the shortest edge and centre-cropped ->
`pixel_values_videos` (B, T, 3, S, S); `<video>` expands to T*(S/patch)^2/4 tokens (2x2 pooling;
the CLS token dropped: vision_feature_select_strategy "default")."""

from __future__ import annotations

from vpref.models.families.base import FRAME_SIZE, Family, text_config, tiny_size
from vpref.models.video_processors import TorchVideoProcessor


class TorchLlavaNextVideoVideoProcessor(TorchVideoProcessor):
    genuine = "LlavaNextVideoVideoProcessor"
    size = {"shortest_edge": 224}
    crop_size = {"height": 224, "width": 224}
    do_center_crop = True


class LlavaNextVideo(Family):
    model_type = "llava_next_video"
    processor_class = "LlavaNextVideoProcessor"
    image_processor_class = "LlavaNextImageProcessor"
    video_processor = TorchLlavaNextVideoVideoProcessor
    vision_modules = ("model.vision_tower",)
    vision_prefixes = ("vision_tower.", "model.vision_tower.")
    tiny_patch = 16

    def tiny_config(self, tokenizer, size):
        from transformers import LlavaNextVideoConfig

        v_hidden, v_depth, v_heads = tiny_size(size)[5:]
        tid = tokenizer.convert_tokens_to_ids
        vision = dict(model_type="clip_vision_model", hidden_size=v_hidden, intermediate_size=2 * v_hidden,
                      num_hidden_layers=v_depth, num_attention_heads=v_heads, image_size=FRAME_SIZE,
                      patch_size=self.tiny_patch, projection_dim=v_hidden)
        return LlavaNextVideoConfig(
            text_config=text_config(tokenizer, size, "llama"), vision_config=vision,
            image_token_index=tid("<image>"), video_token_index=tid("<video>"), vision_feature_layer=-1,
            vision_feature_select_strategy="default", image_grid_pinpoints=[[FRAME_SIZE, FRAME_SIZE]],
            spatial_pool_stride=2, tie_word_embeddings=True)

    def tiny_processor(self, tokenizer, config):
        from transformers import LlavaNextVideoProcessor

        s = config.vision_config.image_size
        return LlavaNextVideoProcessor(
            video_processor=self.video_processor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}),
            image_processor=self.tiny_image_processor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                                      image_grid_pinpoints=[[s, s]]),
            tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            chat_template=tokenizer.chat_template)


FAMILY = LlavaNextVideo()
