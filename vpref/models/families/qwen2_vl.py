"""Qwen2-VL and Qwen2.5-VL: flattened 14-px patches + `video_grid_thw`; the processor expands
`<|video_pad|>` to t*h*w/4 tokens and returns `mm_token_type_ids` (transformers 5 places vision
tokens by type); Qwen2.5-VL also places them in time (`second_per_grid_ts`, from the frames'
metadata)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from vpref.models.families.base import Family, text_config, tiny_size
from vpref.models.video_processors import TorchQwenVideoProcessor

@lru_cache(maxsize=64)
def _preprocessor(path: str):
    from vpref.models.processor import VideoPreprocessor

    return VideoPreprocessor.from_pretrained(path)


QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


def video_pixel_kwargs(pre, num_frames: int | None = None) -> dict[str, int]:
    """min/max pixels that make vLLM's resize (`smart_resize` with these bounds) equal
    `pre.resized_hw` (`pre`: a `VideoPreprocessor`).  With `cap_pixels_per_frame` the bound
    depends on the frame count, so pass `num_frames` (per-prompt kwargs); without it the
    engine-level bounds are enough."""
    max_pixels = pre.max_pixels
    if pre.cap_pixels_per_frame and num_frames:
        factor = pre.patch_size * pre.merge_size
        total = int(pre.max_video_tokens * factor * factor * 0.9)
        max_pixels = max(min(max_pixels, total * pre.temporal_patch_size // num_frames), int(pre.min_pixels * 1.05))
    return {"min_pixels": int(pre.min_pixels), "max_pixels": int(max_pixels)}


def mrope_sections(head_dim: int) -> list[int]:
    """M-RoPE sections (time, height, width) summing to head_dim / 2, in Qwen's 16:24:24 shape."""
    half = head_dim // 2
    return [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]


class Qwen2VL(Family):
    model_type = "qwen2_vl"
    processor_class = "Qwen2VLProcessor"
    image_processor_class = "Qwen2VLImageProcessor"
    video_processor = TorchQwenVideoProcessor
    config_class = "Qwen2VLConfig"
    mm_token_types = True
    template_video = "<|vision_start|><|video_pad|><|vision_end|>"
    tokens = QWEN_TOKENS
    # The tiny checkpoints' frames: 64x64 -> 56x56 -> 4 merged tokens per pair of frames.
    tiny_pixels = (56 * 56, 112 * 112)

    def preprocessor(self, path: str | Path):
        return _preprocessor(str(path))

    def vllm_engine_mm_kwargs(self, path):
        """min/max pixels so vLLM's resize is the checkpoint's video processor's (older Qwen
        checkpoints give vLLM only the image processor's bounds)."""
        return video_pixel_kwargs(self.preprocessor(path))

    def vllm_prompt_mm_kwargs(self, path, num_frames):
        pre = self.preprocessor(path)
        return video_pixel_kwargs(pre, num_frames) if pre.cap_pixels_per_frame else None

    def tiny_config(self, tokenizer, size):
        import transformers

        hidden, _, heads, _, _, v_hidden, v_depth, v_heads = tiny_size(size)
        tid = tokenizer.convert_tokens_to_ids
        text = text_config(tokenizer, size, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": mrope_sections(hidden // heads)})
        return getattr(transformers, self.config_class)(
            text_config=text, vision_config=self.tiny_vision(v_hidden, v_depth, v_heads, hidden),
            image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
            vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
            tie_word_embeddings=True)

    def tiny_vision(self, v_hidden, v_depth, v_heads, hidden) -> dict:
        return dict(depth=v_depth, embed_dim=v_hidden, hidden_size=hidden, mlp_ratio=2, num_heads=v_heads,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2)

    def tiny_processor(self, tokenizer, config):
        import transformers

        lo, hi = self.tiny_pixels
        video = self.video_processor(size={"shortest_edge": lo, "longest_edge": hi})
        image = self.tiny_image_processor(size={"shortest_edge": lo, "longest_edge": hi}, min_pixels=lo,
                                          max_pixels=hi)
        return getattr(transformers, self.processor_class)(image_processor=image, tokenizer=tokenizer,
                                                           video_processor=video,
                                                           chat_template=tokenizer.chat_template)


class Qwen25VL(Qwen2VL):
    model_type = "qwen2_5_vl"
    processor_class = "Qwen2_5_VLProcessor"
    config_class = "Qwen2_5_VLConfig"

    def tiny_vision(self, v_hidden, v_depth, v_heads, hidden) -> dict:
        return dict(depth=v_depth, hidden_size=v_hidden, intermediate_size=2 * v_hidden, num_heads=v_heads,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                    window_size=56, fullatt_block_indexes=[v_depth - 1], tokens_per_second=2)


QWEN2_VL = Qwen2VL()
QWEN2_5_VL = Qwen25VL()
