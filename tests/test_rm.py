"""The reward model (VLM-RLAIF's context-aware RM): its loss by hand, save/load and the vLLM
export, a real Ray Train job on 2 workers that is killed mid-epoch, resumes and learns a separable
toy set, and the trained model as a judge."""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vpref.config import DataConfig, RMConfig
from vpref.data.manifest import load_manifest
from vpref.models.reward import RewardModel, RMItem, fit_calibration
from vpref.train.losses import rm_loss

BAD = ("I do not know.", "There is nothing to see.", "no no no no")


def test_rm_loss_matches_a_hand_computation():
    c, r = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    w = torch.tensor([1.0, 2.0, 0.5])
    out = rm_loss(c, r, center_coef=0.1, weights=w)
    nll = [math.log(1 + math.exp(-(a - b))) for a, b in zip([1.0, -0.5, 2.0], [0.0, 0.5, 2.5])]
    hand = (1.0 * nll[0] + 2.0 * nll[1] + 0.5 * nll[2]) / 3 + 0.1 * abs((1.0 + 0.0 + 4.5) / 3)
    assert out.loss.item() == pytest.approx(hand, rel=1e-6)
    assert out.metrics()["rewards/accuracy"] == pytest.approx(1 / 3)
    # VLM-RLAIF's form: BCE with logits on r_c - r_r against label 1, plus 1e-3 |mean(r_c + r_r)|
    bce = torch.nn.functional.binary_cross_entropy_with_logits(c - r, torch.ones(3))
    assert rm_loss(c, r).loss.item() == pytest.approx(bce.item() + 1e-3 * 5.5 / 3, rel=1e-6)


def _items():
    cap = "There are two shapes. A red circle appears first and moves left. Then a blue square appears."
    return [RMItem("Which colour is the circle?", "The circle is red.", cap, "The circle is red."),
            RMItem("Which colour is the circle?", "It is blue, I think, or green.", cap, "The circle is red."),
            RMItem("How many shapes are there?", "Two.", cap, None)]


def test_a_saved_reward_model_reloads_with_identical_rewards_and_exports_for_vllm(tiny_ckpt, tmp_path):
    rm = RewardModel.load(tiny_ckpt, video=False)
    torch.manual_seed(0)
    rm.score.weight.data.normal_()
    before = rm.rewards(_items(), batch_size=2)
    assert len(set(before)) == 3  # a padded batch reads each row's own last token
    rm.save(tmp_path / "rm", {"trained_on": ["test"]})
    again = RewardModel.load(tmp_path / "rm")
    assert again.video is False and again.rewards(_items(), batch_size=2) == before  # bit for bit
    assert again.rewards(_items(), batch_size=3) == pytest.approx(before, abs=1e-4)  # padding changes nothing

    # A text backbone (tiny Llama) exported as LlamaForSequenceClassification -- the layout vLLM's
    # pooling runner serves -- gives the same rewards through transformers' own class.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vpref.models.reward import export_sequence_classifier

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=False))
    llama.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    text_rm = RewardModel.load(tmp_path / "llama")
    text_rm.score.weight.data.normal_()
    text_rm.save(tmp_path / "text_rm", {})
    want = text_rm.rewards(_items())
    out = export_sequence_classifier(tmp_path / "text_rm", tmp_path / "seqcls")
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    b = text_rm.batch(_items())
    ids = b.inputs["input_ids"].masked_fill(b.inputs["attention_mask"] == 0, hf.config.pad_token_id)
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=b.inputs["attention_mask"]).logits.squeeze(-1).tolist()
    assert got == pytest.approx(want, abs=1e-5)


def test_calibration_is_the_least_squares_line_clipped_to_the_teachers_range():
    from vpref.models.reward import calibrate

    cal = fit_calibration([0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], [4.0, 5.0], [5.0, 5.0], kind="linear")
    assert cal["a"] == pytest.approx(1.0) and cal["b"] == pytest.approx(1.0) and cal["r2_train"] == pytest.approx(1.0)
    assert calibrate(10.0, cal) == 4.0 and calibrate(-10.0, cal) == 1.0 and calibrate(1.5, cal) == pytest.approx(2.5)
    assert fit_calibration([1.0, 1.0], [2.0, 3.0])["kind"] == "none" and calibrate(0.7, {"kind": "none"}) == 0.7


def test_quantile_calibration_gives_the_rm_the_teachers_score_distribution_in_its_own_order():
    from vpref.models.reward import calibrate

    rng = np.random.default_rng(0)
    rewards = rng.normal(0, 0.1, 400)  # a weak RM: small rewards, loosely tied to the teacher
    scores = np.clip(np.round(3 + 10 * rewards + rng.normal(0, 1, 400)), 1, 5)
    quant = fit_calibration(rewards, scores)
    mapped = np.array([calibrate(r, quant) for r in rewards])
    assert np.all(np.diff(mapped[np.argsort(rewards)]) >= 0)  # monotone: the RM's order is kept
    assert np.quantile(mapped, [0.1, 0.5, 0.9]) == pytest.approx(np.quantile(scores, [0.1, 0.5, 0.9]), abs=0.25)
    linear = [calibrate(r, fit_calibration(rewards, scores, kind="linear")) for r in rewards]
    assert np.std(mapped) > 1.3 * np.std(linear)  # the expected-score line shrinks towards the mean


# --------------------------------------------------------------------------- a real Ray Train job


def _toy_pairs(world, path):
    """Separable: chosen is the reference answer, rejected one of a few non-answers."""
    rows = []
    for i, s in enumerate(load_manifest(world / "train.jsonl").samples):
        rows.append({"prompt": s.question, "chosen": s.answer, "rejected": BAD[i % len(BAD)], "caption": s.caption,
                     "reference": s.answer, "video": s.video, "sample_id": s.id, "chosen_score": 4.5 + 0.1 * (i % 5),
                     "rejected_score": 1.0 + 0.1 * (i % 3), "judge": "toy-teacher"})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def trained(ray_local, world, tiny_ckpt, tmp_path_factory):
    """2 workers, video reward model (frames + caption), rank 1 killed mid-epoch once a checkpoint
    is registered; training resumes from it."""
    from vpref.train.rm import train_rm

    out = tmp_path_factory.mktemp("rmjob")
    data = _toy_pairs(world, out / "toy.parquet")
    cfg = RMConfig(num_workers=2, batch_size=4, epochs=2, lr=2e-3, checkpoint_every=3, eval_fraction=0.2,
                   calibration_samples=40, eval_batch_size=16, max_failures=2)
    storage, progress = out / "job" / "ray_train" / "rm-kill", out / "job" / "progress"
    killed = {}

    def kill_rank1_once_a_checkpoint_is_registered():
        deadline = time.time() + 900  # generous: a loaded 2-core machine starts Ray Train slowly
        while time.time() < deadline and not list(storage.glob("checkpoint_*")):
            time.sleep(0.05)
        time.sleep(3.0)  # Ray Train's controller registers a reported checkpoint when it next polls (2 s)
        if not (progress / "rank1.json").is_file():
            return  # (the test then fails on "no worker was killed")
        st = json.loads((progress / "rank1.json").read_text())
        os.kill(st["pid"], signal.SIGKILL)
        killed.update(st)

    t = threading.Thread(target=kill_rank1_once_a_checkpoint_is_registered, daemon=True)
    t.start()
    res = train_rm(cfg, DataConfig(num_frames=4), [str(data)], out / "job", name="rm-kill", init=str(tiny_ckpt))
    t.join(timeout=5)
    return res, killed, progress, cfg


@pytest.mark.slow
def test_a_train_worker_killed_mid_epoch_is_restarted_and_resumes_from_the_checkpoint(trained):
    res, killed, progress, cfg = trained
    steps_per_epoch = math.ceil(res.data["train_pairs"] // 2 / 4)
    total = cfg.epochs * steps_per_epoch
    assert killed, "no worker was killed"
    assert killed["step"] < total
    assert res.restarts >= 1 and [m["step"] for m in res.metrics] == list(range(1, total + 1))
    after = json.loads((progress / "rank0.json").read_text())
    assert after["step"] == total and after["resumed_from"] in range(3, total, 3)  # a checkpoint, not step 0
    assert after["resumed_from"] % steps_per_epoch != 0  # the checkpoint it resumed from is mid-epoch
    assert after["pid"] != killed["pid"]
    assert [e["epoch"] for e in res.evals] == list(range(cfg.epochs))  # one held-out evaluation per epoch


@pytest.mark.slow
def test_training_moves_heldout_pairwise_accuracy_above_chance_on_a_separable_toy_set(trained):
    res, *_ = trained
    assert res.data["eval_pairs"] >= 10
    assert res.evals[-1]["eval/accuracy"] >= 0.9 and res.evals[-1]["eval/loss"] < math.log(2)
    assert all(np.isfinite(m["loss"]) for m in res.metrics)
    meta = json.loads((Path(res.checkpoint) / "reward_model.json").read_text())
    assert meta["video"] is True and meta["teacher"][0]["judge"] == "toy-teacher" and meta["calibration"]["n"] > 0
    # the trained head reloads through the same path and prefers the held-out chosen answers
    rows = [r for r in pq.read_table(Path(res.checkpoint).parent / "pairs.parquet").to_pylist()
            if r["split"] == "eval"]
    rm = RewardModel.load(res.checkpoint)
    from vpref.models.reward import Clips

    clips = Clips(4, None)
    items = ([RMItem(r["question"], r["chosen"], r["caption"], r["reference"], r["video"]) for r in rows]
             + [RMItem(r["question"], r["rejected"], r["caption"], r["reference"], r["video"]) for r in rows])
    rw = rm.rewards(items, [clips(i.video) for i in items])
    acc = float(np.mean([a > b for a, b in zip(rw[:len(rows)], rw[len(rows):])]))
    assert acc == pytest.approx(res.evals[-1]["eval/accuracy"], abs=1e-9)


@pytest.mark.slow
def test_the_trained_reward_model_judges_with_calibrated_scores_and_explicit_failures(trained, world):
    from vpref.actors.judge import judge_items, make_judge, pair_item, response_item
    from vpref.config import JudgeConfig

    res, *_ = trained
    judge = make_judge(JudgeConfig(kind="reward_model", model=res.checkpoint), actor="t")
    s = load_manifest(world / "test.jsonl").samples[0]
    items = [response_item("r:good", s.answer, s.id, s.question, s.answer, s.caption, s.family, s.video),
             response_item("r:bad", BAD[0], s.id, s.question, s.answer, s.caption, s.family, s.video),
             response_item("r:nocap", s.answer, s.id, s.question, s.answer, None, s.family, s.video),
             pair_item("v1", s.id, ("r:good", s.answer), ("r:bad", BAD[0]), s.question, s.answer, s.caption)]
    items[-1]["video"] = s.video
    js, vs = judge_items(judge, items)
    good, bad, nocap = js
    assert good.ok and bad.ok and good.scores["reward"] > bad.scores["reward"] and good.overall >= bad.overall
    cal = json.loads(open(f"{res.checkpoint}/reward_model.json").read())["calibration"]
    assert cal["lo"] <= good.overall <= cal["hi"]
    assert json.loads(good.raw)["teacher"][0]["judge"] == "toy-teacher" and good.judge.startswith("rm:")
    assert not nocap.ok and "caption" in nocap.error and nocap.overall is None
    assert vs[0].ok and vs[0].consistent and vs[0].preferred == "r:good"


@pytest.mark.slow
def test_a_build_judged_by_the_reward_model_writes_pairs_and_the_engine_switches_back(trained, world, sft_zoo,
                                                                                     tmp_path):
    from conftest import engine_config
    from vpref.actors.judge import response_item
    from vpref.build import DataEngine
    from vpref.config import JudgeConfig
    from vpref.data.schema import read_records
    from vpref.judges.reward_model import identity

    res, *_ = trained
    cfg = engine_config(world, sft_zoo, tmp_path, "run.name=rmtest", "judge.pool.max=1")
    engine = DataEngine(cfg, tmp_path / "state")
    try:
        engine.set_judge(JudgeConfig.model_validate({**cfg.judge.model_dump(), "kind": "reward_model",
                                                     "model": res.checkpoint}))
        samples = load_manifest(world / "train.jsonl").samples[:8]
        built = engine.build(samples, tmp_path / "build")
        assert built.status["complete"] and built.status["judged"] == 8 * 3 and built.status["judge_failures"] == 0
        pairs = read_records(tmp_path / "build", "pairs")
        assert pairs and all(p.judge == identity(res.checkpoint)[0] and p.rubric == "reward_model" for p in pairs)
        assert all(p.chosen_scores["reward"] > p.rejected_scores["reward"] for p in pairs)
        engine.set_judge(cfg.judge)  # the teacher again, e.g. for evaluation
        s = samples[0]
        (j,) = engine.judge_items([response_item("x", s.answer, s.id, s.question, s.answer, s.caption, s.family)])
        assert j.judge == "reference" and j.ok
    finally:
        engine.shutdown()
