"""The torch-only arithmetic of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL video processors.

transformers' `Qwen2VLVideoProcessor` needs torchvision, and on CPU-only machines the only
torchvision on PyPI is a CUDA build that breaks every transformers model import.  This class
does the same arithmetic with torch alone, step for step (uint8 bicubic antialiased resize,
fused rescale+normalise, temporal padding, patchify), so its output is bit-identical to the
processor's (tests/test_processor_parity.py checks wherever torchvision imports).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# What transformers assumes when a video arrives as bare frames without metadata.
DEFAULT_FPS = 24.0


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of `factor`, area within [min, max]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class VideoPreprocessor:
    """Frames in, `pixel_values_videos` / `video_grid_thw` / `second_per_grid_ts` out."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 768
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    rescale_factor: float = 1 / 255
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000
    # "qwen2": Qwen2-VL's smart_resize (the pixel budget is per frame); "qwen3": Qwen3-VL's (the
    # budget counts the frames too, and the per-frame cap differs).
    resize_rule: str = "qwen2"

    CONFIG_NAME = "video_preprocessor_config.json"

    # ------------------------------------------------------------------ sizes

    def resized_hw(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        max_pixels = self.max_pixels
        if self.resize_rule == "qwen3":
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_resize

            if self.cap_pixels_per_frame:
                per_frame = max(min(self.max_video_tokens * factor * factor, max_pixels // num_frames),
                                int(self.min_pixels * 1.05))
                max_pixels = per_frame * num_frames
            return qwen3_resize(num_frames, height, width, temporal_factor=self.temporal_patch_size, factor=factor,
                                min_pixels=self.min_pixels, max_pixels=max_pixels)
        if self.cap_pixels_per_frame:
            total = int(self.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total * self.temporal_patch_size // num_frames), int(self.min_pixels * 1.05))
        return smart_resize(height, width, factor, self.min_pixels, max_pixels)

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        h, w = self.resized_hw(num_frames, height, width)
        t = (num_frames + (-num_frames % self.temporal_patch_size)) // self.temporal_patch_size
        return t, h // self.patch_size, w // self.patch_size

    def num_video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """How many `<|video_pad|>` tokens the prompt needs for one video of this shape."""
        t, h, w = self.grid(num_frames, height, width)
        return t * h * w // (self.merge_size**2)

    # ------------------------------------------------------------------ the transform

    def _one(self, frames) -> tuple[torch.Tensor, list[int]]:
        x = torch.as_tensor(np.array(frames, dtype=np.uint8, copy=True)) if not torch.is_tensor(frames) else frames
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).contiguous()  # (T, C, H, W) uint8
        t_in = x.shape[0]
        h, w = self.resized_hw(t_in, x.shape[2], x.shape[3])
        # Resize the uint8 tensor itself: resizing floats differs from the processor by up to 0.26.
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
        x = (x.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        if pad := -t_in % self.temporal_patch_size:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        gt, gh, gw = x.shape[0] // tp, h // p, w // p
        x = x.view(gt, tp, 3, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, 3 * tp * p * p), [gt, gh, gw]

    def __call__(self, videos, sampled_fps=None) -> dict[str, torch.Tensor]:
        """`videos`: one (T, H, W, 3) uint8 array or a list of them.  `sampled_fps`: frames per
        second of each sampled sequence (one number or one per video); unknown -> 24, as in
        transformers."""
        if isinstance(videos, np.ndarray) and videos.ndim == 4 or torch.is_tensor(videos) and videos.ndim == 4:
            videos = [videos]
        outs = [self._one(v) for v in videos]
        fps = sampled_fps if isinstance(sampled_fps, (list, tuple)) else [sampled_fps] * len(outs)
        if len(fps) != len(outs):
            raise ValueError(f"got {len(fps)} fps values for {len(outs)} videos")
        return {
            "pixel_values_videos": torch.cat([o[0] for o in outs], dim=0),
            "video_grid_thw": torch.tensor([o[1] for o in outs], dtype=torch.long),
            "second_per_grid_ts": torch.tensor(
                [self.temporal_patch_size / (f or DEFAULT_FPS) for f in fps], dtype=torch.float32
            ),
        }

    # ------------------------------------------------------------------ persistence

    def to_hf_dict(self, video_processor_type: str = "Qwen2VLVideoProcessor") -> dict:
        """The config in the format transformers' Qwen2VL/Qwen3VL video processors save and load."""
        return {
            "video_processor_type": video_processor_type,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "do_sample_frames": False,  # vpref's decoder samples the frames
            "resample": 3,  # bicubic
            "cap_pixels_per_frame": self.cap_pixels_per_frame,
            "max_video_tokens": self.max_video_tokens,
        }

    @classmethod
    def from_hf_dict(cls, cfg: dict, resize_rule: str = "qwen2") -> "VideoPreprocessor":
        """From a Qwen video processor config, or (older checkpoints) the image processor's, which
        spells the bounds min_pixels / max_pixels."""
        size = cfg.get("size") or {}
        kw = {
            "min_pixels": cfg.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels,
            "max_pixels": cfg.get("max_pixels") or size.get("longest_edge") or cls.max_pixels,
        }
        if cfg.get("video_processor_type") and size.get("shortest_edge"):  # the video processor's own keys win
            kw = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
        for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor",
                  "max_video_tokens"):
            if cfg.get(k) is not None:
                kw[k] = cfg[k]
        kw["cap_pixels_per_frame"] = bool(cfg.get("cap_pixels_per_frame") or False)
        return cls(resize_rule=resize_rule, **kw)

    @classmethod
    def from_pretrained(cls, path: str | Path, resize_rule: str | None = None) -> "VideoPreprocessor":
        """Read a checkpoint's video processor config: the nested one in processor_config.json
        (transformers 5), else video_preprocessor_config.json, else the image processor's."""
        path = Path(path)
        cfg = None
        nested = path / "processor_config.json"
        if nested.is_file():
            cfg = json.loads(nested.read_text()).get("video_processor")
        for name in (cls.CONFIG_NAME, "preprocessor_config.json"):
            if cfg is None and (path / name).is_file():
                cfg = json.loads((path / name).read_text())
        if cfg is None:
            raise FileNotFoundError(f"{path} has no video processor config (processor_config.json, {cls.CONFIG_NAME} "
                                    "or preprocessor_config.json): is it a Qwen-VL checkpoint?")
        if resize_rule is None:
            resize_rule = "qwen3" if str(cfg.get("video_processor_type", "")).startswith("Qwen3") else "qwen2"
        return cls.from_hf_dict(cfg, resize_rule)

    def describe(self) -> dict:
        return asdict(self)
