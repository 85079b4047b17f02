"""Bit-parity of vpref's torch-only preprocessor with transformers' Qwen2VLVideoProcessor.

The reference needs torchvision, which cannot be installed on the CPU machines (PyPI's only build
is a CUDA one and breaks transformers), so this runs wherever torchvision imports (GPU machines)
and is skipped, with the reason shown, elsewhere.
"""

import numpy as np
import pytest
import torch

from vpref.models.processor import VideoPreprocessor

try:
    import torchvision  # noqa: F401
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    REASON = None
except Exception as e:  # ImportError, or RuntimeError from a CUDA torchvision on a CPU machine
    REASON = f"torchvision does not import here ({type(e).__name__}: {str(e)[:80]}); parity runs where it does"


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("shape", [(8, 64, 64, 3), (7, 90, 120, 3), (4, 56, 56, 3), (16, 200, 320, 3)])
@pytest.mark.parametrize("pixels,cap", [((56 * 56, 112 * 112), False), ((56 * 56, 28 * 28 * 768), False),
                                        ((56 * 56, 28 * 28 * 768), True)])
def test_bit_identical_to_transformers(shape, pixels, cap):
    frames = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    ref = Qwen2VLVideoProcessor(size={"shortest_edge": pixels[0], "longest_edge": pixels[1]}, do_sample_frames=False,
                                cap_pixels_per_frame=cap)(videos=[frames], return_tensors="pt")
    ours = VideoPreprocessor(min_pixels=pixels[0], max_pixels=pixels[1], cap_pixels_per_frame=cap)(frames)
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
