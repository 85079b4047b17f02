import json

import numpy as np
import pytest
import torch

from vpref.config import SamplingConfig
from vpref.models.generation import generate
from vpref.models.processor import VideoPreprocessor
from vpref.models.video_lm import VideoLM, sequence_logps


def test_tiny_checkpoint_is_a_real_qwen25vl_folder(tiny_ckpt, tiny_vlm):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl"
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "processor_config.json",
            "generation_config.json"} <= {p.name for p in tiny_ckpt.iterdir()}
    # The genuine class names, so AutoProcessor (and vLLM) build transformers' own processor.
    proc = json.loads((tiny_ckpt / "processor_config.json").read_text())
    assert proc["processor_class"] == "Qwen2_5_VLProcessor"
    assert proc["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert proc["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    assert type(tiny_vlm.processor).__name__ == "Qwen2_5_VLProcessor"
    n = sum(p.numel() for p in tiny_vlm.model.parameters())
    assert 0.5e6 < n < 2e6
    assert type(tiny_vlm.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    # The world's words are single tokens of the locally trained tokenizer.
    assert len(tiny_vlm.tokenizer.tokenize("The red circle moves left.")) == 6


def test_prompt_has_one_video_placeholder_per_video_token(tiny_vlm, clip):
    ids = tiny_vlm.prompt_ids("What colour is the circle?", clip.frames)
    n_video = ids.count(tiny_vlm.processor.video_token_id)
    pre = VideoPreprocessor.from_pretrained(tiny_vlm.path)
    assert n_video == pre.num_video_tokens(*clip.frames.shape[:3]) == 16
    text = tiny_vlm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and text.endswith("<|im_start|>assistant\n")


def test_preprocessor_shapes_and_temporal_padding():
    vp = VideoPreprocessor(min_pixels=56 * 56, max_pixels=112 * 112)
    frames = np.random.default_rng(0).integers(0, 255, (7, 64, 64, 3), dtype=np.uint8)
    out = vp([frames, frames[:4]], sampled_fps=[4.0, None])
    assert out["video_grid_thw"].tolist() == [[4, 4, 4], [2, 4, 4]]  # 7 frames padded to 8
    assert out["pixel_values_videos"].shape == (64 + 32, 3 * 2 * 14 * 14)
    assert out["second_per_grid_ts"].tolist() == pytest.approx([0.5, 2 / 24])
    # The padded frame is a copy of the last one: its patches equal the previous frame's.
    x = out["pixel_values_videos"][:64].view(4, 16, 3, 2, 14, 14)
    assert torch.equal(x[3, :, :, 0], x[3, :, :, 1])
    # Background at the normaliser's mean maps to ~0 (what makes small shapes salient).
    grey = np.zeros((2, 56, 56, 3), np.uint8) + np.array([123, 117, 104], np.uint8)
    assert vp(grey)["pixel_values_videos"].abs().max() < 0.02


def test_forward_generate_and_logps_on_real_video(tiny_vlm, clip):
    frames = [clip.frames, clip.frames]
    qs = ["What colour is the circle?", "How many shapes are in the video?"]
    batch = tiny_vlm.generation_batch(frames, qs, fps=[clip.sampled_fps] * 2)
    with torch.no_grad():
        logits = tiny_vlm.model(**batch.inputs).logits
    assert logits.shape == (2, batch.inputs["input_ids"].shape[1], len(tiny_vlm.tokenizer))
    out = generate(tiny_vlm, frames, qs, SamplingConfig(temperature=1.0, n=3, max_new_tokens=6, seed=1))
    assert [len(o) for o in out] == [3, 3]
    for c in out[0] + out[1]:
        assert 1 <= c.num_tokens <= 6 and c.finish_reason in ("stop", "length")
        assert c.finish_reason == "stop" or c.num_tokens == 6
    # Same seed, same samples; another seed, other samples.
    again = generate(tiny_vlm, frames, qs, SamplingConfig(temperature=1.0, n=3, max_new_tokens=6, seed=1))
    other = generate(tiny_vlm, frames, qs, SamplingConfig(temperature=1.0, n=3, max_new_tokens=6, seed=2))
    assert again == out and other != out


def test_batched_greedy_generation_matches_one_by_one(tiny_vlm, world):
    """Left padding and per-video position ids must not change any answer."""
    from vpref.data.video import decode_video

    clips = [decode_video(p, 8) for p in sorted((world / "videos").glob("*.mp4"))[:3]]
    qs = ["What colour is the circle?", "Describe the video in detail.", "How many shapes appear?"]
    greedy = SamplingConfig(temperature=0, max_new_tokens=8)
    batched = generate(tiny_vlm, [c.frames for c in clips], qs, greedy, fps=[c.sampled_fps for c in clips])
    single = [generate(tiny_vlm, [c.frames], [q], greedy, fps=[c.sampled_fps])[0] for c, q in zip(clips, qs)]
    assert [b[0].text for b in batched] == [s[0].text for s in single]


def test_sequence_logps_equal_token_by_token_computation(tiny_vlm, clip):
    resp = ["The circle is red.", "There are two shapes in the video."]
    b = tiny_vlm.scoring_batch([clip.frames] * 2, ["What colour is the circle?", "How many?"], resp,
                               fps=[clip.sampled_fps] * 2)
    with torch.no_grad():
        got = sequence_logps(tiny_vlm.model, b)
        got_avg = sequence_logps(tiny_vlm.model, b, average=True)
        logits = tiny_vlm.model(**b.inputs).logits.float()
    for i, r in enumerate(resp):
        ids = b.inputs["input_ids"][i]
        positions = b.response_mask[i].nonzero().squeeze(-1).tolist()
        assert len(positions) == len(tiny_vlm.response_ids(r))
        want = sum(torch.log_softmax(logits[i, p - 1], -1)[ids[p]].item() for p in positions)
        assert got[i].item() == pytest.approx(want, rel=1e-5)
        assert got_avg[i].item() == pytest.approx(want / len(positions), rel=1e-5)


def test_save_reload_round_trip(tiny_vlm, clip, tmp_path):
    b = tiny_vlm.scoring_batch([clip.frames], ["What colour is the circle?"], ["The circle is red."])
    with torch.no_grad():
        before = tiny_vlm.model(**b.inputs).logits
    tiny_vlm.model.save_pretrained(tmp_path / "copy")
    tiny_vlm.save_processor(tmp_path / "copy")
    again = VideoLM.load(tmp_path / "copy")
    assert again.processor.video_processor.to_dict() == tiny_vlm.processor.video_processor.to_dict()
    b2 = again.scoring_batch([clip.frames], ["What colour is the circle?"], ["The circle is red."])
    assert torch.equal(b.inputs["input_ids"], b2.inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(before, again.model(**b2.inputs).logits)


def test_unsupported_and_missing_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VideoLM.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        VideoLM.load(tmp_path)


def test_a_checkpoint_in_the_older_qwen_layout_loads_the_same_processor(tiny_ckpt, tiny_vlm, clip, tmp_path):
    """Hub Qwen2.5-VL checkpoints keep their processors in preprocessor_config.json (+ video_
    preprocessor_config.json) and the chat template in chat_template.json, not transformers 5's
    processor_config.json."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_ckpt, old)
    nested = json.loads((old / "processor_config.json").read_text())
    (old / "processor_config.json").unlink()
    (old / "preprocessor_config.json").write_text(json.dumps(
        {**nested["image_processor"], "min_pixels": 56 * 56, "max_pixels": 112 * 112}))
    (old / "video_preprocessor_config.json").write_text(json.dumps(nested["video_processor"]))
    template = (old / "chat_template.jinja").read_text()
    (old / "chat_template.jinja").unlink()
    (old / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    again = VideoLM.load(old)
    assert again.processor.chat_template == template
    a = tiny_vlm.prompt_inputs(clip.frames, "What colour is the circle?", clip.sampled_fps)
    b = again.prompt_inputs(clip.frames, "What colour is the circle?", clip.sampled_fps)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
