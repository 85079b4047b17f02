"""Qwen3-VL: flattened 16-px patches + `video_grid_thw`, mean = std = 0.5, a pixel budget that
counts frames; the processor writes a timestamp before each temporal patch
(`<t seconds><|vision_start|><|video_pad|>*n<|vision_end|>`) from the frames' metadata.

transformers replaces only the template's inner `<|video_pad|>`, keeping its outer
`<|vision_start|>...<|vision_end|>`, while vLLM replaces the whole wrapper: HF and vLLM prompts
differ by those two tokens (vllm-project/vllm#46817, open).  vpref keeps transformers' own
expansion; the GPU parity test marks this family as an expected mismatch."""

from __future__ import annotations

from vpref.models.families.base import text_config, tiny_size
from vpref.models.families.qwen2_vl import QWEN_TOKENS, Qwen2VL, mrope_sections
from vpref.models.video_processors import TorchQwen3VideoProcessor

HALF = [0.5, 0.5, 0.5]


class Qwen3VL(Qwen2VL):
    model_type = "qwen3_vl"
    processor_class = "Qwen3VLProcessor"
    video_processor = TorchQwen3VideoProcessor
    tokens = QWEN_TOKENS
    tiny_pixels = (64 * 64, 64 * 64 * 8)  # 8 frames of 64x64 -> grid 4x4x4 -> 16 tokens

    def vllm_engine_mm_kwargs(self, path):  # Qwen3-VL checkpoints carry their video processor's bounds
        return None

    def vllm_prompt_mm_kwargs(self, path, num_frames):
        return None

    def tiny_config(self, tokenizer, size):
        from transformers import Qwen3VLConfig

        hidden, _, heads, _, _, v_hidden, v_depth, v_heads = tiny_size(size)
        tid = tokenizer.convert_tokens_to_ids
        text = text_config(tokenizer, size, head_dim=hidden // heads,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": mrope_sections(hidden // heads),
                                            "mrope_interleaved": True})
        vision = dict(depth=v_depth, hidden_size=v_hidden, intermediate_size=2 * v_hidden, num_heads=v_heads,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                      num_position_embeddings=16, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=tid("<|image_pad|>"),
                             video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
                             vision_end_token_id=tid("<|vision_end|>"), tie_word_embeddings=True)

    def tiny_processor(self, tokenizer, config):
        from transformers import Qwen3VLProcessor

        lo, hi = self.tiny_pixels
        video = self.video_processor(size={"shortest_edge": lo, "longest_edge": hi}, patch_size=16,
                                     image_mean=HALF, image_std=HALF)
        image = self.tiny_image_processor(size={"shortest_edge": lo, "longest_edge": hi}, patch_size=16,
                                          image_mean=HALF, image_std=HALF)
        return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                chat_template=tokenizer.chat_template)


FAMILY = Qwen3VL()
