"""The vLLM backend.

CPU tests (no vLLM, no GPU) check the logic factored into pure functions against real tiny
checkpoints and real videos: video metadata, resize bounds, prompts, engine and sampling
arguments, output conversion, the vision-skip decision, the architecture guard, the Ray
environment and actor options for tensor parallelism, and the clear errors.

GPU tests (skipped unless CUDA and vLLM are both present) run the real engine: video prompts,
in-place reloads (the engine object stays, the answers change), skipping an unchanged vision
tower, sleep/wake with a reload, the GeneratorActor on Ray, and the judges' chat engine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np
import pytest
import torch

from vpref.actors import vllm_backend as vb
from vpref.actors.backends import GenRequest
from vpref.config import ResourcesConfig, SamplingConfig, VLLMConfig, ZooMember
from vpref.models.processor import DEFAULT_FPS, VideoPreprocessor, smart_resize
from vpref.models.video_lm import VideoLM, chat_prompt

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not (HAS_VLLM and HAS_CUDA), reason="needs a CUDA GPU and vLLM (pip install 'vpref[gpu]')")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_tokenizer):
    """Tiny 3m Qwen2.5-VL checkpoints (head_dim 64, which vLLM's attention accepts):
    a (seed 0), a2 (seed 0 again), b (seed 1), c (a's vision tower + b's language model)."""
    from vpref.models.tiny import build_tiny
    from vpref.train.checkpoint import load_state_dict, save_state_dict

    root = tmp_path_factory.mktemp("vllm_ckpts")
    a = build_tiny(root / "a", "3m", seed=0, tokenizer=tiny_tokenizer)
    a2 = build_tiny(root / "a2", "3m", seed=0, tokenizer=tiny_tokenizer)
    b = build_tiny(root / "b", "3m", seed=1, tokenizer=tiny_tokenizer)
    sa, sb = load_state_dict(a), load_state_dict(b)
    mixed = {k: (sa[k] if k.startswith(vb.VISION_PREFIXES) else v) for k, v in sb.items()}
    c = save_state_dict(mixed, b, root / "c")
    return {"a": a, "a2": a2, "b": b, "c": c}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Real clips: synthetic scenes written as mp4 and decoded back (8 frames each)."""
    from vpref.data.synth import SynthSpec, render, sample_scene
    from vpref.data.video import decode_video, write_video

    out = tmp_path_factory.mktemp("vllm_videos")
    result = []
    for i in range(3):
        path = out / f"v{i}.mp4"
        write_video(path, render(sample_scene(np.random.default_rng([5, i]), SynthSpec())), fps=8)
        result.append(decode_video(path, 8, timeout_s=None))
    return result


QUESTIONS = ["What colour is the circle?", "How many shapes are in the video?", "Describe the video in detail."]


def requests_for(clips) -> list[GenRequest]:
    return [GenRequest(c.frames, c.sampled_fps, q) for c, q in zip(clips, QUESTIONS)]


# --------------------------------------------------------------------------- errors


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_without_vllm_backends_raise_a_clear_import_error(tiny_ckpt):
    for cls in (vb.VLLMBackend, vb.VLLMChat):
        with pytest.raises(ImportError, match=r"pip install 'vpref\[gpu\]'"):
            cls(str(tiny_ckpt), "bfloat16", VLLMConfig())
    # ...and so do the factories that pick a backend from the config.
    from vpref.actors.backends import make_backend
    from vpref.actors.judge import make_judge
    from vpref.config import JudgeConfig

    with pytest.raises(ImportError, match="on a GPU machine"):
        make_backend(ZooMember(path=str(tiny_ckpt), backend="vllm"))
    with pytest.raises(ImportError, match="on a GPU machine"):
        make_judge(JudgeConfig(kind="llm", model=str(tiny_ckpt), backend="vllm"))


def test_missing_gpus_are_a_clear_runtime_error():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        vb.check_gpus(1, 0, None)
    with pytest.raises(RuntimeError, match="needs 2 GPU bundles"):
        vb.check_gpus(2, 0, 1.0)
    vb.check_gpus(2, 0, 2.0)  # a TP actor holds no GPU itself; its placement group does
    vb.check_gpus(1, 1, None)
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            vb.require_gpus(1)


# --------------------------------------------------------------------------- video inputs


def test_video_metadata_gives_the_hf_paths_temporal_positions():
    from transformers.video_utils import VideoMetadata

    pre = VideoPreprocessor()
    frames = np.zeros((8, 64, 64, 3), np.uint8)
    for fps in (2.0, 8 / 3, 8.0, None, 0.0):
        meta = vb.video_metadata(8, 64, 64, fps)
        # vLLM builds VideoMetadata from every key but do_sample_frames: all must be fields.
        vm = VideoMetadata(**{k: v for k, v in meta.items() if k != "do_sample_frames"})
        expected = pre(frames, sampled_fps=fps)["second_per_grid_ts"].item()
        assert pre.temporal_patch_size / vm.sampled_fps == pytest.approx(expected)
        assert vb.second_per_grid_ts(meta, pre.temporal_patch_size) == pytest.approx(expected)
    assert vb.video_metadata(8, 64, 64, None)["fps"] == DEFAULT_FPS == 24
    assert vb.video_metadata(6, 48, 80, 3.0) == {
        "total_num_frames": 6, "fps": 3.0, "duration": 2.0, "frames_indices": [0, 1, 2, 3, 4, 5],
        "width": 80, "height": 48, "do_sample_frames": False}
    with pytest.raises(ValueError):
        vb.video_metadata(0, 64, 64, 2.0)


@pytest.mark.parametrize("cap", [False, True])
def test_pixel_bounds_make_vllms_resize_match_the_preprocessor(cap):
    pre = VideoPreprocessor(min_pixels=56 * 56, max_pixels=28 * 28 * 768, cap_pixels_per_frame=cap,
                            max_video_tokens=1024)
    factor = pre.patch_size * pre.merge_size
    for t in (2, 8, 16, 64):
        kw = vb.video_pixel_kwargs(pre, t)
        for h, w in ((64, 64), (360, 640), (1080, 1920), (30, 500)):
            assert smart_resize(h, w, factor, kw["min_pixels"], kw["max_pixels"]) == pre.resized_hw(t, h, w)
    if cap:  # the cap depends on the frame count: it is a per-prompt bound
        assert vb.video_pixel_kwargs(pre, 64)["max_pixels"] < vb.video_pixel_kwargs(pre, 2)["max_pixels"]
    assert vb.video_pixel_kwargs(pre) == {"min_pixels": pre.min_pixels, "max_pixels": pre.max_pixels}


def test_video_prompt_is_the_hf_paths_prompt_before_expansion(ckpts, clips, tiny_tokenizer):
    path = ckpts["a"]
    pre = VideoPreprocessor.from_pretrained(path)
    proc = vb.family_of(path).load_processor(path)
    tok = proc.tokenizer
    req = requests_for(clips)[0]
    p = vb.video_prompt(proc, req)
    assert p["prompt_token_ids"] == tok(chat_prompt(proc, req.question), add_special_tokens=False)["input_ids"]
    pad = proc.video_token_id
    assert p["prompt_token_ids"].count(pad) == 1  # vLLM expands it itself
    frames, meta = p["multi_modal_data"]["video"]
    assert frames.dtype == np.uint8 and frames.shape == req.frames.shape and frames.flags.c_contiguous
    assert meta["fps"] == pytest.approx(req.fps) and meta["total_num_frames"] == len(frames)
    assert "mm_processor_kwargs" not in p  # the tiny preprocessor does not cap per frame
    # Expanded to the number of video tokens, it is exactly what the HF path feeds the model.
    hf = VideoLM(None, proc, path, "qwen2_5_vl").prompt_ids(req.question, req.frames, req.fps)
    n = pre.num_video_tokens(*req.frames.shape[:3])
    i = p["prompt_token_ids"].index(pad)
    assert p["prompt_token_ids"][:i] + [pad] * n + p["prompt_token_ids"][i + 1:] == hf
    with pytest.raises(ValueError, match="uint8"):
        vb.video_prompt(proc, GenRequest(np.zeros((8, 64, 64)), 2.0, "q"))


def test_stop_tokens_include_the_end_of_turn(ckpts):
    tok = vb._tokenizer(ckpts["a"])
    ids = vb.stop_token_ids(tok, ckpts["a"])
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert all(isinstance(i, int) for i in ids)


# --------------------------------------------------------------------------- engine and sampling arguments


def test_engine_arguments_from_the_config_and_the_checkpoint(ckpts):
    path = ckpts["a"]
    kw = vb.engine_kwargs(path, "bfloat16", VLLMConfig(gpu_memory_utilization=0.5, enable_sleep_mode=True,
                                                       limit_videos_per_prompt=2))
    assert kw["model"] == kw["tokenizer"] == str(path)
    assert kw["dtype"] == "bfloat16" and kw["tensor_parallel_size"] == 1
    assert kw["distributed_executor_backend"] == "uni"
    assert kw["gpu_memory_utilization"] == 0.5 and kw["enable_sleep_mode"] is True and kw["enforce_eager"] is False
    assert kw["limit_mm_per_prompt"] == {"image": 0, "video": 2}
    assert kw["mm_processor_kwargs"] == {"min_pixels": 56 * 56, "max_pixels": 112 * 112}  # build_tiny's
    assert "max_model_len" not in kw  # null: the model's own
    assert "swap_space" not in kw  # removed from vLLM
    tp = vb.engine_kwargs(path, "float16", VLLMConfig(tensor_parallel_size=2, max_model_len=4096))
    assert tp["distributed_executor_backend"] == "ray" and tp["max_model_len"] == 4096
    # The worker extension is a qualified name that resolves, and none of its names can clash
    # with vLLM Worker attributes (vLLM asserts on clashes).
    module, _, name = kw["worker_extension_cls"].rpartition(".")
    ext = getattr(importlib.import_module(module), name)
    assert ext is vb.VPrefWorkerExtension
    assert [a for a in dir(ext) if not a.startswith("__")] == ["vpref_load_checkpoint"]
    chat = vb.chat_engine_kwargs(path, "bfloat16", VLLMConfig(), multimodal=True)
    assert chat["limit_mm_per_prompt"] == {"image": 0, "video": 0} and "worker_extension_cls" not in chat
    assert "limit_mm_per_prompt" not in vb.chat_engine_kwargs(path, "bfloat16", VLLMConfig(), multimodal=False)


def test_sampling_arguments():
    sampled = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=32, n=4)
    kw, repeat = vb.sampling_kwargs(sampled, seed=5, index=0, stop_ids=[7, 9])
    assert repeat == 1
    assert {k: kw[k] for k in ("n", "temperature", "top_p", "max_tokens")} == \
        {"n": 4, "temperature": 0.7, "top_p": 0.9, "max_tokens": 32}
    assert kw["stop_token_ids"] == [7, 9] and "ignore_eos" not in kw
    # Reproducible per (seed, request); different across requests and seeds; int32 even after
    # vLLM adds the sample index.
    seeds = [vb.sampling_kwargs(sampled, 5, i)[0]["seed"] for i in range(200)]
    assert seeds == [vb.sampling_kwargs(sampled, 5, i)[0]["seed"] for i in range(200)]
    assert len(set(seeds)) == 200 and vb.request_seed(6, 0) != vb.request_seed(5, 0)
    assert max(seeds) + 4096 < 2**31
    # Greedy: vLLM refuses n > 1, HF returns n copies -> one sample repeated n times.
    kw, repeat = vb.sampling_kwargs(SamplingConfig(temperature=0, n=3, top_p=0.5), 0, 0, [7])
    assert (kw["n"], kw["temperature"], kw["top_p"], repeat) == (1, 0.0, 1.0, 3)
    # Benchmarks: fixed-length outputs (no stop tokens at all).
    kw, _ = vb.sampling_kwargs(sampled, 0, 0, [7], ignore_eos=True)
    assert kw["ignore_eos"] is True and "stop_token_ids" not in kw
    chat = vb.chat_sampling_kwargs(16, 0.7, 1, 0, [7])
    assert (chat["n"], chat["top_p"], chat["max_tokens"]) == (1, vb.CHAT_TOP_P, 16)
    assert vb.chat_sampling_kwargs(16, 0.0, 1, 0)["top_p"] == 1.0


def test_completions_count_tokens_like_the_hf_path():
    assert vb.to_completion(" The circle is red. ", [4, 5, 6, 7], "stop", [7]) == \
        vb.Completion("The circle is red.", 3, "stop")  # the end-of-turn token is not counted
    assert vb.to_completion("abc", [4, 5, 6], "stop", [7]).num_tokens == 3  # stopped by a stop string
    assert vb.to_completion("abc", [4, 5, 7], "length", [7]) == vb.Completion("abc", 3, "length")
    assert vb.to_completion("", [], "abort", [7]).finish_reason == "error"


# --------------------------------------------------------------------------- checkpoints


def test_vision_tower_comparison_on_real_checkpoints(ckpts, tiny_ckpt):
    a, a2, b, c = ckpts["a"], ckpts["a2"], ckpts["b"], ckpts["c"]
    names = vb.vision_tensor_names(a)
    assert names and all(n.startswith("visual.") for n in names)  # transformers 5's save layout
    assert len(names) < len(vb._tensor_index(a, None))
    assert vb.vision_tensors_equal(a, a2)  # same seed, separate files
    assert not vb.vision_tensors_equal(a, b)
    assert vb.vision_tensors_equal(a, c)  # c kept a's tower, took b's language model
    assert not vb.vision_tensors_equal(a, tiny_ckpt)  # other shapes


def test_vision_skip_decision(ckpts, tmp_path):
    a, b, c = ckpts["a"], ckpts["b"], ckpts["c"]
    sig = vb.files_signature(a)  # taken when the engine loaded a
    assert vb.decide_skip_vision(None, True, a, c, sig) == (True, "vision tensors unchanged")
    assert vb.decide_skip_vision(None, True, a, b, sig) == (False, "vision tensors changed")
    assert vb.decide_skip_vision(None, True, a, a, sig) == (True, "same checkpoint")
    assert vb.decide_skip_vision(None, True, a, c, None) == (False, "weights held by the engine unknown")
    assert vb.decide_skip_vision(False, True, a, c, sig) == (False, "caller")
    assert vb.decide_skip_vision(True, True, a, b, sig) == (True, "caller")
    # After sleep(level=2) there is nothing to keep.
    assert vb.decide_skip_vision(None, False, a, c, sig)[0] is False
    with pytest.raises(ValueError, match="discarded"):
        vb.decide_skip_vision(True, False, a, c, sig)
    # The previous checkpoint was deleted: load everything.
    skip, reason = vb.decide_skip_vision(None, True, tmp_path / "gone", c, sig)
    assert not skip and reason.startswith("cannot compare")


def test_a_rewritten_current_checkpoint_is_not_trusted(ckpts, tmp_path):
    """save_state_dict replaces a folder in place: its files then no longer describe the weights
    the engine loaded from it, even at the same path."""
    from vpref.train.checkpoint import load_state_dict, save_state_dict

    cur = save_state_dict(load_state_dict(ckpts["a"]), ckpts["a"], tmp_path / "policy")
    sig = vb.files_signature(cur)
    assert vb.decide_skip_vision(None, True, cur, ckpts["c"], sig)[0] is True
    save_state_dict(load_state_dict(ckpts["b"]), ckpts["b"], cur)  # rewritten with other weights
    skip, reason = vb.decide_skip_vision(None, True, cur, ckpts["c"], sig)
    assert not skip and "rewritten" in reason
    assert vb.decide_skip_vision(None, True, cur, cur, sig)[0] is False


def test_architecture_guard_and_parameter_count(ckpts, tiny_ckpt):
    from transformers import AutoModelForImageTextToText

    vb.check_same_architecture(ckpts["a"], ckpts["b"])
    vb.check_same_architecture(vb.architecture(ckpts["a"]), ckpts["c"])
    with pytest.raises(ValueError, match="architecture differs.*hidden_size"):
        vb.check_same_architecture(ckpts["a"], tiny_ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpts["a"])
    assert vb.checkpoint_num_params(ckpts["a"]) == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- Ray hosting


def test_tensor_parallel_environment():
    assert vb.tp_env_changes(1, 1, "10.0.0.1:6379", {}) == ({}, [])
    env = {"CUDA_VISIBLE_DEVICES": ""}
    set_vars, unset = vb.tp_env_changes(2, 2, "10.0.0.1:6379", env)
    assert set_vars == {"RAY_ADDRESS": "10.0.0.1:6379", "VLLM_RAY_BUNDLE_INDICES": "0,1"}
    assert unset == ["CUDA_VISIBLE_DEVICES"]
    # What the user set wins.
    set_vars, _ = vb.tp_env_changes(4, 4, "x:1", {"RAY_ADDRESS": "auto", "VLLM_RAY_BUNDLE_INDICES": "3,2,1,0"})
    assert set_vars == {}
    # Not in a placement group: vLLM's Ray executor makes one; it only needs the cluster address.
    assert vb.tp_env_changes(2, None, "x:1", {"CUDA_VISIBLE_DEVICES": "0,1"}) == ({"RAY_ADDRESS": "x:1"}, [])
    with pytest.raises(ValueError, match="needs 4 placement group bundles"):
        vb.tp_env_changes(4, 2, None, {})


def test_actor_options_single_gpu():
    m = ZooMember(backend="vllm", resources=ResourcesConfig(num_cpus=2))
    assert vb.vllm_actor_options(m) == {"num_cpus": 2, "num_gpus": 1, "resources": None}
    m = ZooMember(backend="vllm", resources=ResourcesConfig(num_cpus=1, num_gpus=0.5, custom={"gen": 1}))
    assert vb.vllm_actor_options(m) == {"num_cpus": 1, "num_gpus": 0.5, "resources": {"gen": 1}}
    assert vb.tp_bundles(3, 2, {"gen": 1}) == [{"GPU": 1.0, "CPU": 2.0, "gen": 1}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert vb.tp_bundles(2, 0) == [{"GPU": 1.0}, {"GPU": 1.0}]


def test_actor_options_tensor_parallel_placement_group(ray_local):
    from ray.util import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    m = ZooMember(backend="vllm", vllm=VLLMConfig(tensor_parallel_size=2), resources=ResourcesConfig(num_cpus=1))
    opts = vb.vllm_actor_options(m)
    try:
        assert opts["num_gpus"] == 0 and opts["num_cpus"] == 1
        s = opts["scheduling_strategy"]
        assert isinstance(s, PlacementGroupSchedulingStrategy)
        assert s.placement_group_capture_child_tasks is True and s.placement_group_bundle_index == 0
        assert s.placement_group.bundle_specs == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}]
    finally:
        remove_placement_group(opts["scheduling_strategy"].placement_group)
    # A judge passes its pool resources.
    from vpref.config import JudgeConfig

    judge = JudgeConfig(kind="llm", model="m", backend="vllm")
    assert vb.vllm_actor_options(judge, judge.pool.resources)["num_cpus"] == 0.5


# --------------------------------------------------------------------------- GPU: the real engine


@pytest.fixture(scope="module")
def engine(ckpts):
    backend = vb.VLLMBackend(str(ckpts["a"]), "bfloat16", VLLMConfig(
        gpu_memory_utilization=0.25, enforce_eager=True, max_model_len=2048, enable_sleep_mode=True))
    yield backend
    del backend


GREEDY = SamplingConfig(temperature=0, max_new_tokens=12)


def texts(backend, reqs) -> list[str]:
    return [c[0].text for c in backend.generate(reqs, GREEDY, seed=0)]


def ids(backend, reqs) -> list[list[int]]:
    """Greedy token ids (random tiny models often produce empty or identical *texts*)."""
    from vllm import SamplingParams

    outs = backend.llm.generate(backend.build_prompts(reqs), SamplingParams(temperature=0, max_tokens=12),
                                use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@gpu
def test_generate_for_video_prompts(engine, clips, ckpts):
    from vllm import SamplingParams

    reqs = requests_for(clips)
    # vLLM expanded the placeholder to exactly the HF path's prompt.
    outs = engine.llm.generate(engine.build_prompts(reqs), SamplingParams(max_tokens=1), use_tqdm=False)
    hf = VideoLM(None, engine.processor, ckpts["a"], "qwen2_5_vl")
    assert [list(o.prompt_token_ids) for o in outs] == [hf.prompt_ids(r.question, r.frames, r.fps) for r in reqs]

    out = engine.generate(reqs, SamplingConfig(temperature=0, n=2, max_new_tokens=12), seed=0)
    assert [len(o) for o in out] == [2, 2, 2] and all(o[0] == o[1] for o in out)  # greedy: copies
    sampled = SamplingConfig(temperature=1.0, n=3, max_new_tokens=10)
    a = engine.generate(reqs, sampled, seed=3)
    assert [len(o) for o in a] == [3, 3, 3]
    for c in (c for o in a for c in o):
        assert 0 <= c.num_tokens <= 10 and c.finish_reason in ("stop", "length")
        assert c.finish_reason == "stop" or c.num_tokens == 10
    assert engine.generate(reqs, sampled, seed=3) == a  # seeded: reproducible
    assert engine.generate([], sampled, seed=3) == []
    info = engine.info()
    assert info["backend"] == "vllm" and info["params"] == vb.checkpoint_num_params(ckpts["a"])


@gpu
def test_reload_in_place_changes_answers_not_the_engine(engine, clips, ckpts):
    reqs = requests_for(clips)
    llm, before = engine.llm, ids(engine, reqs)
    r = engine.load_weights(str(ckpts["b"]))
    assert engine.llm is llm and r["tensors"] > 0 and r["skip_vision"] is False and r["ranks"] == 1
    after = ids(engine, reqs)
    assert after != before
    engine.load_weights(str(ckpts["a"]))
    assert engine.llm is llm and ids(engine, reqs) == before  # all weights were replaced
    assert engine.info()["path"] == str(ckpts["a"])


@gpu
def test_reload_keeps_an_unchanged_vision_tower(engine, clips, ckpts):
    reqs = requests_for(clips)
    engine.load_weights(str(ckpts["a"]))
    r = engine.load_weights(str(ckpts["c"]))  # a's tower, b's language model
    assert r["skip_vision"] is True and r["skipped_tensors"] == len(vb.vision_tensor_names(ckpts["c"]))
    kept = ids(engine, reqs)
    engine.load_weights(str(ckpts["b"]))
    r = engine.load_weights(str(ckpts["c"]), skip_vision=False)  # now load c completely
    assert r["skip_vision"] is False and r["skipped_tensors"] == 0
    assert ids(engine, reqs) == kept
    engine.load_weights(str(ckpts["a"]))


@gpu
def test_sleep_then_reload_then_wake(engine, clips, ckpts):
    reqs = requests_for(clips)
    engine.load_weights(str(ckpts["a"]))
    before = ids(engine, reqs)
    engine.sleep(level=2)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(reqs, GREEDY, 0)
    with pytest.raises(RuntimeError, match="wake_up"):
        engine.load_weights(str(ckpts["a"]))
    engine.wake_up(["weights"])
    r = engine.load_weights(str(ckpts["a"]))
    assert r["skip_vision"] is False  # level 2 discarded the tower too
    assert engine.wake_up(["kv_cache"]) is True
    assert ids(engine, reqs) == before


@gpu
def test_generator_actor_hosts_vllm_and_reloads_in_place(ray_local, engine, ckpts, clips):
    """The actor path (Ray, clips by reference) gives the answers the backend gives directly."""
    import ray

    from vpref.actors.generator import GeneratorActor

    reqs = requests_for(clips)
    engine.load_weights(str(ckpts["b"]))
    expected_b = texts(engine, reqs)
    engine.load_weights(str(ckpts["a"]))
    expected_a = texts(engine, reqs)
    member = ZooMember(name="policy", path=str(ckpts["a"]), backend="vllm", dtype="bfloat16", policy=True,
                       vllm=VLLMConfig(gpu_memory_utilization=0.2, enforce_eager=True, max_model_len=2048))
    actor = ray.remote(GeneratorActor).options(**vb.vllm_actor_options(member)).remote(
        member.model_dump(), "gen-policy-0")
    try:
        info = ray.get(actor.info.remote())
        refs = [ray.put(c) for c in clips]
        greedy = GREEDY.model_dump()
        a = ray.get(actor.generate.remote(refs, QUESTIONS, greedy, 0))
        r = ray.get(actor.load_weights.remote(str(ckpts["b"]), 1))
        b = ray.get(actor.generate.remote(refs, QUESTIONS, greedy, 0))
        after = ray.get(actor.info.remote())
        assert r["version"] == 1 and r["pid"] == info["pid"] and r["tensors"] > 0
        assert after["engine_id"] == info["engine_id"] and after["version"] == 1
        assert [[c.text for c in x] for x in a] == [[t] for t in expected_a]
        assert [[c.text for c in x] for x in b] == [[t] for t in expected_b]
        with pytest.raises(ray.exceptions.RayTaskError, match="does not score"):
            ray.get(actor.score_pairs.remote([], {}, 1))
    finally:
        ray.kill(actor)


@gpu
def test_vllm_chat_for_llm_judges(ckpts):
    from vpref.judges.llm import LLMJudge

    chat = vb.VLLMChat(str(ckpts["a"]), "bfloat16", VLLMConfig(gpu_memory_utilization=0.15, enforce_eager=True,
                                                               max_model_len=2048))
    prompts = ["Rate the answer: The circle is red.", "Which answer is better, A or B?"]
    greedy = chat.chat(prompts, max_new_tokens=8, temperature=0.0)
    assert len(greedy) == 2 and all(isinstance(t, str) for t in greedy)
    assert chat.chat(prompts, 8, 0.0) == greedy
    assert chat.chat(prompts, 8, 0.7, seed=1) == chat.chat(prompts, 8, 0.7, seed=1)
    judge = LLMJudge(chat, max_new_tokens=8)
    assert judge.name == f"llm:{os.path.basename(str(ckpts['a']))}"


def test_gpu_tests_are_marked():
    """Every test that starts an engine is skipped without CUDA + vLLM (nothing is mocked)."""
    gpu_tests = [test_generate_for_video_prompts, test_reload_in_place_changes_answers_not_the_engine,
                 test_reload_keeps_an_unchanged_vision_tower, test_sleep_then_reload_then_wake,
                 test_generator_actor_hosts_vllm_and_reloads_in_place, test_vllm_chat_for_llm_judges]
    for t in gpu_tests:
        marks = [m for m in getattr(t, "pytestmark", []) if m.name == "skipif"]
        assert marks and marks[0].args[0] == (not (HAS_VLLM and HAS_CUDA))


def test_module_imports_without_vllm_or_gpu():
    """The driver, the CPU tests and vLLM's worker processes import this module; it must not
    pull in vLLM (imported lazily, where an engine is built)."""
    import subprocess
    import sys

    code = ("import sys, vpref.actors.vllm_backend as m; "
            "assert 'vllm' not in sys.modules; print(m.WORKER_EXTENSION)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == vb.WORKER_EXTENSION
