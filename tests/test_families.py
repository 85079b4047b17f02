"""Every registered video-LLM family, end to end on CPU: transformers' real processor class around
the torch-only video processor (genuine class names on disk), prompts expanded by transformers
itself, batched generation and DPO scoring that do not depend on padding, the generator actor on
Ray (answer, score, reload in place), the per-family dataset card, and a LLaVA-OneVision policy
through one DPO round (data build with a two-family zoo, Ray Train, ExPO, reload into its actor).

The checkpoints are tiny (0.2m), random, built once for the module from the shared tokenizer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
import torch

from vpref.config import DataConfig, SamplingConfig, ZooMember
from vpref.data.video import decode_video
from vpref.models.families import SUPPORTED, get_family
from vpref.models.generation import generate
from vpref.models.video_lm import VideoLM, sequence_logps

FAMILIES = sorted(SUPPORTED)
# (placeholder the processor repeats, how many times) for one 8-frame 64x64 clip, from each
# family's own expansion rule and the tiny configs (see the family modules' docstrings).
EXPANSION = {
    "qwen2_vl": ("<|video_pad|>", 16),  # 56x56 -> 4x4 patches of 14, 4 temporal groups, 2x2 merge
    "qwen2_5_vl": ("<|video_pad|>", 16),
    "qwen3_vl": ("<|video_pad|>", 16),  # 64x64 -> 4x4 patches of 16, 4 groups of 4, each with a timestamp
    "llava_onevision": ("<video>", 8 * 4 + 1),  # 4x4 patches pooled to 2x2 per frame, + 1 newline
    "llava_next_video": ("<video>", 8 * 4),  # (64/16)^2 / 4 per frame
    "internvl": ("<IMG_CONTEXT>", 8 * 4),  # per frame: (64/16)^2 * 0.5^2
}
QUESTIONS = ["What colour is the circle?", "How many shapes are in the video?", "Describe the video in detail."]


@pytest.fixture(scope="module")
def family_ckpts(tmp_path_factory, tiny_tokenizer):
    """family -> (checkpoint, a perturbed twin with the same architecture)."""
    from vpref.models.tiny import build_tiny
    from vpref.train.checkpoint import load_state_dict, save_state_dict

    root = tmp_path_factory.mktemp("families")
    out = {}
    for f in FAMILIES:
        a = build_tiny(root / f, "0.2m", seed=0, tokenizer=tiny_tokenizer, family=f)
        g = torch.Generator().manual_seed(1)
        sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in load_state_dict(a).items()}
        out[f] = (a, save_state_dict(sd, a, root / f"{f}-b"))
    return out


@pytest.fixture(scope="module")
def vlms(family_ckpts):
    return {f: VideoLM.load(a) for f, (a, _) in family_ckpts.items()}


@pytest.fixture(scope="module")
def clips(world):
    return [decode_video(p, 8) for p in sorted((world / "videos").glob("*.mp4"))[:3]]


def test_each_family_runs_transformers_processor_saved_under_genuine_names(family_ckpts, vlms, clips):
    from vpref.actors.vllm_weights import vision_tensor_names

    clip = clips[0]
    for f in FAMILIES:
        fam, vlm, path = get_family(f), vlms[f], family_ckpts[f][0]
        assert vlm.family is fam and type(vlm.processor).__name__ == fam.processor_class
        cfg = json.loads((path / "processor_config.json").read_text())
        assert cfg["processor_class"] == fam.processor_class
        assert cfg["video_processor"]["video_processor_type"] == fam.video_processor.genuine
        assert cfg["image_processor"]["image_processor_type"] == fam.image_processor_class
        assert json.loads((path / "config.json").read_text())["model_type"] == f
        # The prompt is the template's one placeholder, expanded by transformers' processor.
        assert vlm.prompt_text(QUESTIONS[0]).count(vlm.processor.video_token) == 1
        ids = vlm.prompt_ids(QUESTIONS[0], clip.frames, clip.sampled_fps)
        token, n = EXPANSION[f]
        assert ids.count(vlm.tokenizer.convert_tokens_to_ids(token)) == n, f
        text = vlm.tokenizer.decode(ids)
        if f == "qwen3_vl":  # one timestamp per temporal patch, from the clip's fps
            assert text.count(" seconds>") == 4 and f"<{0.5 / clip.sampled_fps:.1f} seconds>" in text
        if f == "internvl":  # the video becomes per-frame images
            assert all(f"Frame{i}: <img>" in text for i in range(1, 9))
        # freeze_vision finds the tower; its tensors are the ones a vLLM reload may skip.
        tower = fam.vision_tower(vlm.model)
        on_disk = vision_tensor_names(path, fam.vision_prefixes)
        assert len(on_disk) == len(tower.state_dict()) > 0, f


def test_batched_generation_and_scoring_do_not_depend_on_padding(vlms, clips):
    frames, fps = [c.frames for c in clips], [c.sampled_fps for c in clips]
    greedy = SamplingConfig(temperature=0, max_new_tokens=6)
    answers = ["The circle is red.", "There are two shapes.", "A blue square moves left."]
    for f, vlm in vlms.items():
        batched = generate(vlm, frames, QUESTIONS, greedy, fps=fps)
        single = [generate(vlm, [c], [q], greedy, fps=[p])[0] for c, q, p in zip(frames, QUESTIONS, fps)]
        assert [b[0].text for b in batched] == [s[0].text for s in single], f
        with torch.no_grad():
            lp = sequence_logps(vlm.model, vlm.scoring_batch(frames, QUESTIONS, answers, fps))
            one = [sequence_logps(vlm.model, vlm.scoring_batch([c], [q], [a], [p])).item()
                   for c, q, a, p in zip(frames, QUESTIONS, answers, fps)]
        assert lp.tolist() == pytest.approx(one, rel=1e-4, abs=1e-4), f
        assert torch.isfinite(lp).all()


def _pair_rows(world, n):
    from vpref.data.manifest import load_manifest
    from vpref.data.world import perturb

    rng = np.random.default_rng(0)
    return [{"pair_id": f"p{i}", "prompt": s.question, "chosen": s.answer, "rejected": perturb(s.answer, rng),
             "video": s.video} for i, s in enumerate(load_manifest(world / "train.jsonl").samples[:n])]


def test_every_family_answers_scores_and_reloads_in_its_generator_actor(ray_local, family_ckpts, vlms, world, clips):
    from vpref.actors.generator import GeneratorActor
    from vpref.train.dpo import score_pairs

    remote = ray.remote(GeneratorActor)
    greedy = SamplingConfig(temperature=0, max_new_tokens=6).model_dump()
    data = DataConfig(num_frames=8)
    rows = _pair_rows(world, 2)
    actors = {f: remote.options(num_cpus=0.1).remote(
        ZooMember(name=f"fam-{f}", path=str(a), family=f, batch_size=4).model_dump(), f"gen-fam-{f}")
        for f, (a, _) in family_ckpts.items()}  # all start at once: their imports overlap
    refs = [ray.put(c) for c in clips[:2]]
    try:
        for f, actor in actors.items():
            a, b = (str(p) for p in family_ckpts[f])
            info = ray.get(actor.info.remote())
            assert info["family"] == f and info["version"] == 0
            answers = ray.get(actor.generate.remote(refs, QUESTIONS[:2], greedy, 0))
            local = generate(vlms[f], [c.frames for c in clips[:2]], QUESTIONS[:2], SamplingConfig(**greedy),
                             fps=[c.sampled_fps for c in clips[:2]], seed=0)
            assert answers == local, f  # the actor runs the same code on the same weights
            # DPO scoring in the actor (the reference log-probs of a round) = the local computation.
            scored = ray.get(actor.score_pairs.remote(rows, data.model_dump(), 2))
            assert scored == score_pairs(vlms[f], rows, data, 2), f
            assert all(np.isfinite(s[1]) and np.isfinite(s[2]) and s[3] > 1 for s in scored)
            # In place: same process, new weights, new log-probs; back to the first weights, the first log-probs.
            r = ray.get(actor.load_weights.remote(b, 1))
            assert r["pid"] == info["pid"] and r["version"] == 1 and r["tensors"] > 0
            moved = ray.get(actor.score_pairs.remote(rows, data.model_dump(), 2))
            assert [m[1] for m in moved] != [s[1] for s in scored], f
            ray.get(actor.load_weights.remote(a, 2))
            assert ray.get(actor.score_pairs.remote(rows, data.model_dump(), 2)) == scored, f
            assert ray.get(actor.info.remote())["pid"] == info["pid"]
    finally:
        for actor in actors.values():
            ray.kill(actor)


def test_a_member_of_the_wrong_family_or_an_unknown_one_is_refused(family_ckpts, tmp_path):
    from vpref.actors.backends import check_family
    from vpref.config import ConfigError, load_config

    llava = str(family_ckpts["llava_onevision"][0])
    assert check_family(ZooMember(name="x", path=llava, family="llava_onevision")) == "llava_onevision"
    assert check_family(ZooMember(name="x", path=llava)) == "llava_onevision"  # no family declared: the checkpoint's
    with pytest.raises(ValueError, match="is a llava_onevision checkpoint, the config says family 'qwen2_5_vl'"):
        check_family(ZooMember(name="x", path=llava, family="qwen2_5_vl"))
    with pytest.raises(ConfigError, match=r"unknown model family .llava. \(did you mean .llava_next_video. or .llava_onevision.\?\)"):
        load_config(None, ["zoo.2.family=llava"])
    with pytest.raises(ConfigError, match="smollm2 is built as a LLaVA-OneVision"):
        load_config(None, ["sft.members=[{name: s, family: internvl, text_model: smollm2}]"])
    with pytest.raises(ConfigError, match="init_from 'a' is a qwen2_5_vl"):
        load_config(None, ["sft.members=[{name: a}, {name: b, family: internvl, init_from: a}]"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "video_llava"}))
    with pytest.raises(ValueError, match="model_type 'video_llava' is not supported yet.*Adding a model family"):
        VideoLM.load(tmp_path)


def test_torch_only_video_processors_refuse_what_they_would_silently_get_wrong(vlms):
    from vpref.models.families.llava_next_video import TorchLlavaNextVideoVideoProcessor

    frames = np.zeros((8, 64, 64, 3), np.uint8)
    proc = vlms["llava_onevision"].processor.video_processor
    with pytest.raises(ValueError, match="do_sample_frames must be False"):
        proc(frames, do_sample_frames=True)
    with pytest.raises(ValueError, match=r"takes no per-call \['size'\]"):
        proc(frames, size={"height": 32, "width": 32})
    with pytest.raises(ValueError, match="differently shaped frames"):
        proc([frames, frames[:4]])
    with pytest.raises(ValueError, match="resample=1 has no torch kernel"):
        TorchLlavaNextVideoVideoProcessor(resample=1)(frames)
    with pytest.raises(ValueError, match=r"uint8 frames \(T, H, W, 3\)"):
        proc(frames[..., 0])
    # Shortest edge, then the centre crop: 96x128 -> 64x85 -> the middle 64 columns.
    out = TorchLlavaNextVideoVideoProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})(
        np.zeros((2, 96, 128, 3), np.uint8))["pixel_values_videos"]
    assert out.shape == (1, 2, 3, 64, 64)


def test_the_card_breaks_the_win_rate_down_by_model_family(family_ckpts, tmp_path):
    from vpref.data.card import card_stats, write_card
    from vpref.data.schema import Judgment, Pair, Response, write_shard

    paths = {"qwen-a": family_ckpts["qwen2_5_vl"][0], "qwen-b": family_ckpts["qwen2_5_vl"][1],
             "llava": family_ckpts["llava_onevision"][0], "gone": tmp_path / "deleted"}
    resp, judg, pairs = [], [], []
    wins = {"qwen-a": 3, "qwen-b": 1, "llava": 0, "gone": 0}  # chosen counts; llava is rejected in every pair
    for q in range(4):
        for m, p in paths.items():
            rid = f"r{q}-{m}"
            resp.append(Response(rid, f"s{q}", 1, m, str(p), m == "llava", 0, 0, "x", 1, "stop", 1.0, 1.0, 0))
            judg.append(Judgment(f"j{rid}", rid, f"s{q}", "reference", "r", "v", True, overall=2.0 + (m == "qwen-a")))
        chosen = "qwen-a" if q < 3 else "qwen-b"
        pairs.append(Pair(f"p{q}", "q", "c", "r", "v.mp4", f"s{q}", "colour", 1, 0, f"r{q}-{chosen}", f"r{q}-llava",
                          chosen, "llava", 3.0, 2.0, 1.0, {}, {}, "", "", {}, {}, 1, 1, "reference", "r", "v",
                          "best_vs_worst", "off"))
    for table, records in (("responses", resp), ("judgments", judg), ("pairs", pairs)):
        write_shard(tmp_path, table, records)
    stats = card_stats(tmp_path)
    assert stats["model_families"] == {"qwen-a": "qwen2_5_vl", "qwen-b": "qwen2_5_vl", "llava": "llava_onevision",
                                       "gone": "?"}
    fam = stats["win_rate_by_family"]
    assert fam["qwen2_5_vl"]["models"] == ["qwen-a", "qwen-b"]
    assert (fam["qwen2_5_vl"]["chosen"], fam["qwen2_5_vl"]["rejected"], fam["qwen2_5_vl"]["win_rate"]) == (4, 0, 1.0)
    assert (fam["llava_onevision"]["chosen"], fam["llava_onevision"]["rejected"]) == (0, 4)
    assert fam["llava_onevision"]["win_rate"] == 0.0 and fam["?"]["win_rate"] is None
    assert fam["qwen2_5_vl"]["mean_score"] == 2.5 and fam["qwen2_5_vl"]["responses"] == 8  # over its 8 judgments
    assert sum(w["chosen"] for w in fam.values()) == sum(wins.values()) == len(pairs)
    text = (write_card(tmp_path), (tmp_path / "README.md").read_text())[1]
    assert "## Model families" in text and "| llava_onevision | llava | 4 | 2.0 | 0 | 4 | 0.0 |" in text
    assert "Endpoint usage" not in text  # a local judge sent no request: no line of zeros


def test_the_three_family_gpu_recipe_and_the_smollm2_demo_config():
    from pathlib import Path

    from vpref.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(root / "recipes" / "zoo-3families-1node-8gpu.yaml")
    gens = [m for m in cfg.zoo if m.role == "generator"]
    assert [m.family for m in gens] == ["qwen2_5_vl", "llava_onevision", "internvl"]
    assert cfg.policy_member.family == "qwen2_5_vl" and all(m.backend == "vllm" for m in cfg.zoo)
    assert all(get_family(m.family).vllm_video for m in cfg.zoo)  # vLLM takes video for every member
    # 8 GPUs: two engines per generator GPU, the judge's TP group, the DPO workers.
    gpus = sum(m.resources.num_gpus * m.replicas for m in cfg.zoo)
    assert gpus + cfg.judge.vllm.tensor_parallel_size + cfg.dpo.num_workers * cfg.dpo.gpus_per_worker <= 8
    assert all(2 * m.vllm.gpu_memory_utilization < 0.9 for m in cfg.zoo)
    # The longest video prompt fits: InternVL3 at 448 px is 256 tokens a frame (+ its "FrameN:" labels).
    assert all(m.vllm.max_model_len >= cfg.data.num_frames * (256 + 8) + m.sampling.max_new_tokens for m in gens)
    demo = load_config(root / "demo-smollm2.yaml")
    smol = next(m for m in demo.sft.members if m.text_model == "smollm2")
    assert smol.family == "llava_onevision" and smol.name in {m.name for m in demo.zoo}
    assert {m.family for m in demo.zoo} == {"qwen2_5_vl", "llava_onevision"}
    assert len({m.family for m in load_config(None).zoo}) >= 2  # the default demo spans two families


@pytest.mark.slow
def test_a_llava_onevision_policy_completes_a_round(ray_local, family_ckpts, world, sft_zoo, tmp_path):
    """Data from a two-family zoo (the LLaVA-OneVision policy beside a Qwen2.5-VL member), its
    reference log-probs from the policy's own actor, DPO on Ray Train (DDP, 2 workers), ExPO, and
    the result reloaded in place into the policy's actor, which now prefers the chosen answers more."""
    from vpref.actors.vllm_weights import vision_tensors_equal
    from vpref.build import DataEngine
    from vpref.config import load_config
    from vpref.data.card import write_card
    from vpref.data.manifest import load_manifest
    from vpref.train.checkpoint import load_state_dict
    from vpref.train.dpo import reference_logps, train_dpo
    from vpref.train.expo import extrapolate

    policy = family_ckpts["llava_onevision"][0]
    out = tmp_path / "round"
    cfg = load_config(None, [
        f"data.root={world}", f"data.train={world}/train.jsonl", f"data.dev={world}/dev.jsonl",
        f"data.test={world}/test.jsonl", f"run.out_dir={out}", "run.name=llava-round",
        f"zoo=[{{name: policy, path: '{policy}', family: llava_onevision, policy: true, batch_size: 8,"
        f" resources: {{num_cpus: 0.5}}, sampling: {{temperature: 1.0, n: 2, max_new_tokens: 16}}}},"
        f" {{name: qwen, path: '{sft_zoo}/policy', family: qwen2_5_vl, batch_size: 8, resources: {{num_cpus: 0.5}},"
        f" sampling: {{temperature: 0.7, n: 1, max_new_tokens: 16}}}}]",
        "judge.pool.min=1", "judge.pool.max=1", "judge.pool.batch_size=8", "pairs.min_margin=0.1",
        "dpo.num_workers=2", "dpo.epochs=2", "dpo.batch_size=4", "dpo.lr=3e-3",
    ])
    engine = DataEngine(cfg, out / "state")
    try:
        engine.wait_ready()
        build = engine.build(load_manifest(world / "train.jsonl").samples[:24], out / "data", round_=1)
        card = write_card(out / "data", build.summary())
        fam = card["win_rate_by_family"]
        assert set(fam) == {"llava_onevision", "qwen2_5_vl"} and card["pairs"] >= 4
        assert sum(f["chosen"] for f in fam.values()) == sum(f["rejected"] for f in fam.values()) == card["pairs"]
        (actor,) = engine.policy_replicas()
        before = ray.get(actor.info.remote())
        pairs_ref = reference_logps(policy, out / "data", out / "train" / "pairs_ref.parquet", cfg.data, 16,
                                    actors=[actor])  # the policy's actor holds the reference weights
        trained = train_dpo(cfg.dpo, cfg.data, policy, pairs_ref, out / "train", name="llava-round", seed=1)
        assert trained.metrics and all(np.isfinite(m["loss"]) for m in trained.metrics)
        theta = extrapolate(trained.checkpoint, policy, 0.5, out / "policy")  # ExPO
        got = engine.reload_policy(theta, version=1)
        after = ray.get(actor.info.remote())
        assert got[0]["version"] == after["version"] == 1 and after["pid"] == before["pid"]  # in place
        assert after["path"] == str(theta) and after["family"] == "llava_onevision"
        # The new weights rank the judge's chosen answers higher than the reference did.
        import pyarrow.parquet as pq

        rows = pq.read_table(pairs_ref).to_pylist()
        new = {r[0]: r[1] - r[2] for r in ray.get(actor.score_pairs.remote(rows, cfg.data.model_dump(), 16))}
        gain = [new[r["pair_id"]] - (r["ref_chosen_logp"] - r["ref_rejected_logp"]) for r in rows]
        assert np.mean(gain) > 0 and np.mean(np.array(gain) > 0) > 0.5
        # DDP on 2 workers: the tower's post-layernorm, which video features never reach, was frozen
        # (DDP refuses parameters without gradient); everything else the loss reaches moved.
        a, b = load_state_dict(policy), load_state_dict(theta)
        moved = {k for k in a if not torch.equal(a[k], b[k])}
        assert not any("post_layernorm" in k for k in moved)
        assert any(k.startswith("multi_modal_projector.") for k in moved)
        assert any(k.startswith("vision_tower.encoder.") for k in moved)
        assert not vision_tensors_equal(policy, theta, get_family("llava_onevision").vision_prefixes)
        clip = decode_video(rows[0]["video"], 8)
        (answer,) = ray.get(actor.generate.remote([clip], [rows[0]["prompt"]], None, 0))
        assert len(answer) == 2 and all(c.finish_reason in ("stop", "length") for c in answer)  # the member's n
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------- GPU: HF vs vLLM prompts

HAS_VLLM_GPU = torch.cuda.is_available() and __import__("importlib.util").util.find_spec("vllm") is not None
gpu = pytest.mark.skipif(not HAS_VLLM_GPU, reason="needs a CUDA GPU and vLLM (pip install 'vpref[gpu]')")
VLLM_FAMILIES = [f for f in FAMILIES if get_family(f).vllm_video]


@gpu
@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.xfail(
        reason="transformers keeps the template's <|vision_start|>...<|vision_end|> around Qwen3-VL's expansion, "
               "vLLM replaces it: vllm-project/vllm#46817 (open)", strict=False)) if f == "qwen3_vl" else f
    for f in VLLM_FAMILIES])
def test_vllm_runs_the_hf_paths_prompt_tokens_and_reloads_in_place(family, tiny_tokenizer, clips, tmp_path):
    """The engine's prompt after its own expansion is token for token the HF path's, and the
    engine reloads a checkpoint of the family in place (3m models: head_dim 64, which vLLM's
    attention kernels take)."""
    from vpref.actors.backends import GenRequest
    from vpref.actors.vllm_backend import VLLMBackend
    from vpref.config import VLLMConfig
    from vpref.models.tiny import build_tiny

    path = build_tiny(tmp_path / family, "3m", tokenizer=tiny_tokenizer, family=family)
    engine = VLLMBackend(str(path), "bfloat16", VLLMConfig(gpu_memory_utilization=0.2, enforce_eager=True,
                                                           max_model_len=2048))
    try:
        from vllm import SamplingParams

        reqs = [GenRequest(c.frames, c.sampled_fps, q) for c, q in zip(clips, QUESTIONS)]
        outs = engine.llm.generate(engine.build_prompts(reqs), SamplingParams(max_tokens=1), use_tqdm=False)
        hf = VideoLM(None, engine.processor, path, family)
        assert [list(o.prompt_token_ids) for o in outs] == [hf.prompt_ids(r.question, r.frames, r.fps) for r in reqs]
        # In-place reload into the engine: a perturbed twin changes the greedy tokens, the original restores them.
        from vpref.train.checkpoint import load_state_dict, save_state_dict

        g = torch.Generator().manual_seed(1)
        twin = save_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                                for k, v in load_state_dict(path).items()}, path, tmp_path / f"{family}-b")

        def greedy():
            res = engine.llm.generate(engine.build_prompts(reqs), SamplingParams(temperature=0, max_tokens=8),
                                      use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in res]

        llm, before = engine.llm, greedy()
        r = engine.load_weights(str(twin))
        assert engine.llm is llm and r["tensors"] > 0 and greedy() != before
        engine.load_weights(str(path))
        assert greedy() == before
    finally:
        del engine


@pytest.mark.slow
def test_the_smollm2_member_is_sft_trained_and_answers_fluently(world, clips, tmp_path):
    """LLaVA-OneVision around SmolLM2-135M-Instruct: built with SmolLM2's weights (strictly), SFT'd
    through the normal path, saved and reloaded as an ordinary checkpoint, fluent at once."""
    from vpref.config import load_config
    from vpref.train.sft import run_sft

    cfg = load_config(None, [
        f"data.root={world}", f"data.train={world}/train.jsonl", f"data.dev={world}/dev.jsonl",
        f"sft.out={tmp_path}/sft", "sft.batch_size=2", "sft.warmup_steps=1", "sft.eval_max_new_tokens=8",
        "sft.members=[{name: smol, family: llava_onevision, text_model: smollm2, size: 0.2m, steps: 1, lr: 1.0e-5}]",
    ])
    report = run_sft(cfg)["members"]["smol"]
    assert report["params"] > 130e6 and report["model_type"] == "llava_onevision"
    vlm = VideoLM.load(tmp_path / "sft" / "smol")
    assert type(vlm.processor).__name__ == "LlavaOnevisionProcessor" and vlm.tokenizer.video_token == "<video>"
    text = vlm.prompt_text("What is the capital of France?")  # its own template loops over the parts
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\n<video>\nWhat is the capital of France?<|im_end|>" in text
    (answer,) = generate(vlm, [clips[0].frames], ["What is the capital of France?"],
                         SamplingConfig(temperature=0, max_new_tokens=12), fps=[clips[0].sampled_fps])
    assert "Paris" in answer[0].text and answer[0].finish_reason == "stop"
