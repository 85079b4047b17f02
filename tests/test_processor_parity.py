"""Bit-parity of vpref's torch-only video processors with transformers' genuine (torchvision)
ones, for every registered family.

The references need torchvision, which cannot be installed on the CPU machines (PyPI's only build
is a CUDA one and breaks transformers), so these run wherever torchvision imports (GPU machines)
and are skipped, with the reason shown, elsewhere.  The tiny checkpoints save their processors
under the genuine class names, so `AutoProcessor.from_pretrained` builds the genuine processor
from the same folder the torch-only one was saved from.
"""

import numpy as np
import pytest
import torch

from vpref.models.families import SUPPORTED, get_family
from vpref.models.processor import VideoPreprocessor
from vpref.models.video_processors import torchvision_works

try:
    import torchvision  # noqa: F401
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    REASON = None if torchvision_works() else "torchvision imports but its transforms do not"
except Exception as e:  # ImportError, or RuntimeError from a CUDA torchvision on a CPU machine
    REASON = f"torchvision does not import here ({type(e).__name__}: {str(e)[:80]}); parity runs where it does"
needs_torchvision = pytest.mark.skipif(REASON is not None, reason=REASON or "")
SHAPES = [(8, 64, 64, 3), (7, 90, 120, 3), (16, 240, 320, 3), (8, 360, 480, 3)]


@needs_torchvision
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


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory, tiny_tokenizer):
    from vpref.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("parity")
    return {f: build_tiny(root / f, "0.2m", tokenizer=tiny_tokenizer, family=f) for f in sorted(SUPPORTED)}


@needs_torchvision
@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_every_family_torch_only_processor_equals_the_genuine_one(family, family_folders):
    from vpref.models.video_lm import VideoLM

    fam, path = get_family(family), family_folders[family]
    genuine, ours = fam.load_processor(path, genuine=True), fam.load_processor(path, genuine=False)
    assert type(genuine).__name__ == type(ours).__name__ == fam.processor_class
    assert type(genuine.video_processor).__name__ == fam.video_processor.genuine  # AutoProcessor read the names
    assert type(ours.video_processor) is fam.video_processor
    g, o = VideoLM(None, genuine, path, fam), VideoLM(None, ours, path, fam)
    for shape in SHAPES:
        frames = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
        a = g.prompt_inputs(frames, "What colour is the circle?", fps=4.0)
        b = o.prompt_inputs(frames, "What colour is the circle?", fps=4.0)
        assert set(a) == set(b), shape
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), (family, shape, k)
