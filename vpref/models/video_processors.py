"""Torch-only video processors that plug into transformers' own processor classes.

Every transformers `*VideoProcessor` is torchvision-backed, and on CPU machines the only
torchvision on PyPI is a CUDA build that breaks every transformers import.  These classes do the
same arithmetic with torch alone (the uint8 bicubic antialiased resize torchvision itself calls,
integer centre crop, fused rescale + normalise; Qwen's patchify), so the real processor class
(`LlavaOnevisionProcessor`, `Qwen2_5_VLProcessor`, ...) runs unchanged around them and prompt
expansion stays transformers' own.  They save their config under the *genuine* class name, so
a machine with torchvision (and vLLM) loads the genuine processor from the same folder;
tests/test_processor_parity.py compares the two wherever torchvision imports.

Frames arrive already sampled (vpref's decoder picks them), so frame sampling is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vpref.models.processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VideoPreprocessor

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes -> torch modes (uint8 antialiased kernels)


def export_video_processor_mixin():
    """`ProcessorMixin` checks a video processor's class by looking `VideoProcessorMixin` up on
    the top-level transformers module, which exports it only when torchvision imports."""
    import sys

    import transformers
    from transformers import processing_utils
    from transformers.video_processing_utils import VideoProcessorMixin

    # processing_utils looks names up on its own handle of the package module, which need not be
    # the object `import transformers` returns: set it on every handle.
    for module in {id(m): m for m in (transformers, sys.modules.get("transformers"),
                                      getattr(processing_utils, "transformers_module", None))}.values():
        if module is not None and not hasattr(module, "VideoProcessorMixin"):
            setattr(module, "VideoProcessorMixin", VideoProcessorMixin)
    return VideoProcessorMixin


def save_processor(processor, out: str | Path) -> None:
    """`processor.save_pretrained` (tokenizer, chat template, processor_config.json), with the
    genuine image-processor class name written: the PIL one stands in for it without torchvision,
    and the torch-only video processor writes its genuine name itself."""
    import json

    processor.save_pretrained(out)
    path = Path(out) / "processor_config.json"
    cfg = json.loads(path.read_text())
    image = cfg.get("image_processor") or {}
    if str(image.get("image_processor_type", "")).endswith("Pil"):
        image["image_processor_type"] = image["image_processor_type"][: -len("Pil")]
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def torchvision_works() -> bool:
    """True where transformers' genuine (torchvision) video processors can run."""
    try:
        from transformers.utils import is_torchvision_available

        if not is_torchvision_available():
            return False
        import torchvision.transforms.v2.functional  # noqa: F401 (a CUDA-only build fails here)
        return True
    except Exception:
        return False


def _uint8_tchw(video) -> torch.Tensor:
    x = video if torch.is_tensor(video) else torch.from_numpy(np.array(video, dtype=np.uint8, copy=True))
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"a video must be uint8 frames (T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).contiguous()


def _batched(videos) -> list:
    """One (T, H, W, 3) video, or a (nested) list of them -> a flat list."""
    if torch.is_tensor(videos) or isinstance(videos, np.ndarray):
        return [videos] if videos.ndim == 4 else list(videos)
    out = []
    for v in videos:
        out += _batched(v) if isinstance(v, (list, tuple)) else [v]
    return out


def _metadata(videos: list[torch.Tensor], video_metadata) -> list:
    from transformers.video_utils import VideoMetadata

    if video_metadata is None:
        video_metadata = [{"total_num_frames": len(v), "frames_indices": list(range(len(v)))} for v in videos]
    if isinstance(video_metadata, (dict, VideoMetadata)):
        video_metadata = [video_metadata]
    out = [m if isinstance(m, VideoMetadata) else VideoMetadata(**m) for m in video_metadata]
    if len(out) != len(videos):
        raise ValueError(f"got {len(out)} video_metadata entries for {len(videos)} videos; pass one per video")
    return out


VideoProcessorMixin = export_video_processor_mixin()


class _TorchVideoProcessorBase(VideoProcessorMixin):
    """Shared plumbing: videos in, a `BatchFeature` of torch tensors out (whatever return_tensors
    asks), metadata passed through when asked for."""

    genuine = ""  # the transformers class this one stands in for (its name is what gets saved)
    CONFIG_KEYS: tuple[str, ...] = ()
    do_sample_frames = False
    return_metadata = False

    def __init__(self, **kwargs):
        for k in ("video_processor_type", "processor_class", "image_processor_type"):
            kwargs.pop(k, None)
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        out = {k: _plain(getattr(self, k, None)) for k in self.CONFIG_KEYS}
        out["video_processor_type"] = self.genuine
        return out

    def preprocess(self, videos, return_tensors=None, video_metadata=None, return_metadata=None,
                   do_sample_frames=None, **kwargs):
        from transformers import BatchFeature

        if do_sample_frames:
            raise ValueError(f"{type(self).__name__}: frames arrive sampled (by vpref's decoder); "
                             "do_sample_frames must be False")
        if kwargs:  # per-call overrides would silently not apply: refuse them
            raise ValueError(f"{type(self).__name__} takes no per-call {sorted(kwargs)}; set them in the "
                             "checkpoint's video processor config (processor_config.json)")
        clips = [_uint8_tchw(v) for v in _batched(videos)]
        data = self.transform(clips)
        if return_metadata if return_metadata is not None else self.return_metadata:
            data["video_metadata"] = _metadata(clips, video_metadata)
        return BatchFeature(data, skip_tensor_conversion=["video_metadata"])

    def transform(self, clips: list[torch.Tensor]) -> dict:
        raise NotImplementedError


def _plain(v):
    if isinstance(v, dict) or hasattr(v, "keys") and hasattr(v, "__getitem__"):
        return {k: v[k] for k in v.keys() if v[k] is not None}
    if isinstance(v, tuple):
        return list(v)
    return v


class TorchVideoProcessor(_TorchVideoProcessorBase):
    """transformers' `BaseVideoProcessor` pipeline: resize (to height x width, or the shortest edge
    with the aspect ratio kept), optional centre crop, rescale + normalise ->
    `pixel_values_videos` (B, T, 3, H, W).  LLaVA-OneVision, LLaVA-NeXT-Video, InternVL and
    Video-LLaVA use it with their own class defaults (subclasses set them)."""

    CONFIG_KEYS = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "do_normalize",
                   "do_convert_rgb", "image_mean", "image_std", "rescale_factor", "resample", "default_to_square",
                   "do_sample_frames")
    model_input_names = ["pixel_values_videos"]
    size = {"height": 384, "width": 384}
    crop_size = None
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    rescale_factor = 1 / 255
    resample = 3
    default_to_square = False

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        size = dict(self.size)
        if size.get("height") and size.get("width"):
            return int(size["height"]), int(size["width"])
        if size.get("shortest_edge"):
            from transformers.image_transforms import get_resize_output_image_size
            from transformers.image_utils import ChannelDimension

            h, w = get_resize_output_image_size(np.zeros((3, height, width), np.uint8), size=size["shortest_edge"],
                                                default_to_square=False, input_data_format=ChannelDimension.FIRST)
            return int(h), int(w)
        raise ValueError(f"{type(self).__name__}: size must have height and width, or shortest_edge; got {size}")

    def transform(self, clips):
        mode = _RESAMPLE.get(int(self.resample))
        if mode is None:
            raise ValueError(f"{type(self).__name__}: resample={self.resample} has no torch kernel (2 bilinear, "
                             "3 bicubic); set resample: 3 in the checkpoint's video processor config")
        out = []
        for x in clips:
            if self.do_resize:
                hw = self.output_hw(*x.shape[-2:])
                if tuple(x.shape[-2:]) != hw:  # torchvision returns the input untouched when sizes match
                    # On the uint8 tensor itself: torchvision's CPU path calls exactly this kernel.
                    x = F.interpolate(x, size=hw, mode=mode, antialias=True, align_corners=False)
            if self.do_center_crop:
                ch, cw = int(self.crop_size["height"]), int(self.crop_size["width"])
                h, w = x.shape[-2:]
                if ch > h or cw > w:
                    raise ValueError(f"{type(self).__name__}: crop {ch}x{cw} is larger than the resized frame {h}x{w}")
                top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
                x = x[..., top:top + ch, left:left + cw]
            out.append(_rescale_normalize(x, self))
        shapes = sorted({tuple(v.shape) for v in out})
        if len(shapes) > 1:
            raise ValueError(f"{type(self).__name__}: the clips of one batch give differently shaped frames {shapes}; "
                             "decode every clip to the same number of frames and size (data.num_frames, "
                             "data.frame_size)")
        return {"pixel_values_videos": torch.stack(out)}


def _rescale_normalize(x: torch.Tensor, p) -> torch.Tensor:
    """transformers' fused rescale + normalise: (x - mean/r) / (std/r) in float32."""
    if p.do_rescale and p.do_normalize:
        mean = torch.tensor(p.image_mean) * (1.0 / p.rescale_factor)
        std = torch.tensor(p.image_std) * (1.0 / p.rescale_factor)
        return (x.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    if p.do_normalize:
        mean, std = torch.tensor(p.image_mean), torch.tensor(p.image_std)
        return (x.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    if p.do_rescale:
        return x.to(torch.float32) * p.rescale_factor
    return x.to(torch.float32)


class TorchQwenVideoProcessor(_TorchVideoProcessorBase):
    """Qwen2-VL / Qwen2.5-VL (`resize_rule` qwen2) and Qwen3-VL (qwen3) video processing:
    smart_resize, normalise, temporal padding, patchify (`vpref.models.processor`) ->
    `pixel_values_videos` (sum of t*h*w, C*tp*p*p) and `video_grid_thw`."""

    genuine = "Qwen2VLVideoProcessor"
    resize_rule = "qwen2"
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, **kwargs):
        pre = VideoPreprocessor.from_hf_dict(kwargs, self.resize_rule)
        super().__init__()
        self.pre = pre
        d = pre.to_hf_dict(self.genuine)
        for k in ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                  "rescale_factor", "cap_pixels_per_frame", "max_video_tokens"):
            setattr(self, k, d[k])

    def to_dict(self) -> dict:
        return self.pre.to_hf_dict(self.genuine)

    def transform(self, clips):
        out = self.pre([c.permute(0, 2, 3, 1) for c in clips])
        return {"pixel_values_videos": out["pixel_values_videos"], "video_grid_thw": out["video_grid_thw"]}


class TorchQwen3VideoProcessor(TorchQwenVideoProcessor):
    genuine = "Qwen3VLVideoProcessor"
    resize_rule = "qwen3"
