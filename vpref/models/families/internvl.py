"""InternVL 3 / 3.5 in the transformers ("-hf") format: the processor folds the video into
per-frame images (`pixel_values` (sum of T, 3, S, S); the model has no video input) and expands
`<video>` to `Frame{i}: <img><IMG_CONTEXT>*n</img>` lines, n = (S/patch)^2 * downsample_ratio^2."""

from __future__ import annotations

from vpref.models.families.base import FRAME_SIZE, Family, text_config, tiny_size
from vpref.models.video_processors import TorchVideoProcessor

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class TorchInternVLVideoProcessor(TorchVideoProcessor):
    genuine = "InternVLVideoProcessor"
    size = {"height": 384, "width": 384}


class InternVL(Family):
    model_type = "internvl"
    processor_class = "InternVLProcessor"
    image_processor_class = "GotOcr2ImageProcessor"
    video_processor = TorchInternVLVideoProcessor
    vision_modules = ("model.vision_tower",)
    vision_prefixes = ("vision_tower.", "model.vision_tower.")
    tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
              "video_token": "<video>"}
    tiny_patch = 16  # 64x64 -> 4x4 patches -> pixel shuffle 0.5 -> 4 tokens a frame

    def tiny_config(self, tokenizer, size):
        from transformers import InternVLConfig

        v_hidden, v_depth, v_heads = tiny_size(size)[5:]
        vision = dict(hidden_size=v_hidden, intermediate_size=2 * v_hidden, num_hidden_layers=v_depth,
                      num_attention_heads=v_heads, image_size=[FRAME_SIZE, FRAME_SIZE],
                      patch_size=[self.tiny_patch, self.tiny_patch])
        n = (FRAME_SIZE // self.tiny_patch) ** 2 // 4
        return InternVLConfig(text_config=text_config(tokenizer, size, "qwen2"), vision_config=vision,
                              image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=n,
                              downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=True)

    def tiny_processor(self, tokenizer, config):
        from transformers import InternVLProcessor

        s = config.vision_config.image_size[0]
        image = self.tiny_image_processor(size={"height": s, "width": s}, image_mean=IMAGENET_MEAN,
                                          image_std=IMAGENET_STD, crop_to_patches=False)
        video = self.video_processor(size={"height": s, "width": s}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        return InternVLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                 image_seq_length=config.image_seq_length, chat_template=tokenizer.chat_template)


FAMILY = InternVL()
