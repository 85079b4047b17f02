"""The synthetic world's versions of each evaluation set (written by `vpref synth` without
changing its train/dev/test manifests), the suites run on them by the reference judge, and the
baseline's answers made once and cached."""

import json

import pytest

from vpref.config import load_config
from vpref.data.manifest import load_manifest
from vpref.data.world import QUESTION_TEMPLATES, perturb
from vpref.eval.judge import ReferenceSuiteJudge
from vpref.eval.runner import SuiteRunner


def _cfg(world, *extra):
    return load_config(None, [f"data.root={world}", f"data.train={world}/train.jsonl", f"data.dev={world}/dev.jsonl",
                              f"data.test={world}/test.jsonl", "eval.bootstrap=200", *extra])


def test_eval_sets_are_the_test_questions_plus_a_second_wording(world):
    test = {(s.video, s.question): s for s in load_manifest(world / "test.jsonl").samples}
    sets = {n: load_manifest(world / f"{n}.jsonl").samples
            for n in ("vcgpt_generic", "vcgpt_temporal", "vcgpt_consistency", "zeroshot_qa")}
    assert {s.family for s in sets["vcgpt_generic"]} == {"describe"}
    assert {s.family for s in sets["vcgpt_temporal"]} <= {"order", "direction"}
    assert "describe" not in {s.family for s in sets["zeroshot_qa"]}
    for name in ("vcgpt_generic", "vcgpt_temporal", "zeroshot_qa"):  # the same questions: answers are reused
        assert all((s.video, s.question) in test and test[(s.video, s.question)].answer == s.answer
                   for s in sets[name])
    videos = {s.video for s in test.values()}
    assert {s.video for s in sets["vcgpt_consistency"]} == videos  # one pair per test video
    for s in sets["vcgpt_consistency"]:
        q1, q2 = s.question, s.meta["question2"]
        assert q1 != q2 and (s.video, q1) in test and test[(s.video, q1)].answer == s.answer
        assert any(q2.startswith(t.split("{")[0]) for t in QUESTION_TEMPLATES[s.family])


def test_writing_the_eval_sets_leaves_train_dev_test_byte_identical(tmp_path, monkeypatch):
    from vpref.data import synth

    spec = synth.SynthSpec(n=12, seed=3)
    synth.synthesize(tmp_path / "with", spec)
    monkeypatch.setattr(synth, "make_eval_samples", lambda *a, **k: {n: [] for n in synth.EVAL_SETS})
    synth.synthesize(tmp_path / "without", spec)
    for f in ("train.jsonl", "dev.jsonl", "test.jsonl", "scenes.json"):
        assert (tmp_path / "with" / f).read_bytes() == (tmp_path / "without" / f).read_bytes(), f
    assert (tmp_path / "with" / "vcgpt_consistency.jsonl").stat().st_size > 0


def test_suites_on_the_world_with_the_reference_judge(world, tmp_path):
    cfg = _cfg(world)
    runner = SuiteRunner(cfg, ReferenceSuiteJudge(), tmp_path / "cache", tmp_path / "rejects.jsonl")
    assert not runner.sets.missing
    by_key = {(s.video, s.question): s for name in ("generic", "temporal", "consistency", "qa")
              for s in runner.sets.named(name)}
    # a perfect policy: every question answered with its reference answer
    perfect = {}
    for k in runner.asks:
        s = by_key.get(k) or next(x for x in runner.sets.consistency if (x.video, x.meta["question2"]) == k)
        perfect[k] = s.answer
    import numpy as np

    rng = np.random.default_rng(0)
    wrong = {k: perturb(a, rng) for k, a in perfect.items()}  # one world word swapped: a plausible wrong answer
    metrics, rows = runner.run(perfect, wrong)
    d = metrics["videochatgpt"]["dimensions"]
    assert all(d[k]["value"] == 5 and d[k]["failed"] == 0 for k in d), d
    assert metrics["videochatgpt"]["mean"]["value"] == 5
    zs = metrics["zeroshot"]["sets"]["synth-qa"]
    assert zs["accuracy"]["value"] == 1.0 and zs["no"] == 0 and zs["score"]["value"] == 5
    assert metrics["grounded"]["sets"]["synth-qa"]["share_ge3"]["value"] == 1.0
    w = metrics["winrate"]
    # the reference answer never loses: a swapped word is wrong, or names something the caption lacks
    assert w["losses"] == 0 and w["wins"] + w["ties"] == w["questions"] and w["wins"] > 0.9 * w["questions"]
    assert w["win_rate"]["ci95"][0] > 0.6 and w["lc_win_rate"]["value"] > 0.6
    assert metrics["judge"]["name"] == "reference" and metrics["winrate"]["version"].startswith("winrate/")
    assert len(rows) == sum(1 for r in rows if r["ok"])
    # the baseline the other way round: the wrong policy against the perfect one
    back, _ = runner.run(wrong, perfect)
    assert back["winrate"]["wins"] == 0 and back["winrate"]["win_rate"]["value"] < 0.2
    assert back["videochatgpt"]["mean"]["value"] < metrics["videochatgpt"]["mean"]["value"]
    # the report's tables and plot
    from vpref.eval.report import plot_suites
    from vpref.eval.tables import round_summary, suite_tables

    rounds = [{"round": 1, "eval": {"suites": metrics}}, {"round": 2, "eval": {"suites": back}}]
    text = suite_tables(rounds)
    assert text.count("judge `reference`") == 4 and "| 1 | 5.00 [5.00, 5.00] |" in text and "| 2 | synth-qa |" in text
    assert "Mean 5.00 [5.00, 5.00]" in round_summary(1, rounds[0]["eval"])
    plot_suites(rounds, tmp_path / "suites.png")
    assert (tmp_path / "suites.png").stat().st_size > 10_000


def test_the_baseline_answers_are_made_once_and_cached(world, tmp_path):
    policy = tmp_path / "sft"
    policy.mkdir()
    (policy / "model.safetensors").write_bytes(b"x")
    cfg = _cfg(world, f"zoo.0.path={policy}", "eval.suites=[winrate]", "eval.max_items=5")
    runner = SuiteRunner(cfg, ReferenceSuiteJudge(), tmp_path / "cache")
    asks = runner.asks
    base = {k: f"baseline {i}" for i, k in enumerate(asks)}
    assert runner.baseline_answers(str(policy), generate_baseline=None) is None  # round 0: it is the baseline
    runner.cache.put(str(policy), base)  # (what the round-0 evaluation does with its answers)
    calls = []

    def generate(keys):
        calls.append(keys)
        return {k: "made" for k in keys}

    got = runner.baseline_answers(str(tmp_path / "round_1"), generate)
    assert got == base and not calls  # from the cache, nothing regenerated
    again = SuiteRunner(load_config(None, [*_cfg_args(world), f"zoo.0.path={policy}", "eval.suites=[winrate]",
                                           "eval.max_items=8"]), ReferenceSuiteJudge(), tmp_path / "cache")
    got = again.baseline_answers(str(tmp_path / "round_1"), generate)
    assert len(calls) == 1 and set(calls[0]) == set(again.asks) - set(asks)  # only the new questions
    assert all(got[k] == base[k] for k in asks)
    (policy / "model.safetensors").write_bytes(b"new weights")  # another checkpoint at the same path
    assert again.cache.get(str(policy)) == {}


def _cfg_args(world):
    return [f"data.root={world}", f"data.train={world}/train.jsonl", f"data.dev={world}/dev.jsonl",
            f"data.test={world}/test.jsonl"]


def test_sets_with_bad_rows_are_set_aside_and_missing_sets_are_named(world, tmp_path):
    bad = tmp_path / "cons.jsonl"
    rows = [json.loads(x) for x in (world / "vcgpt_consistency.jsonl").read_text().splitlines()[:3]]
    rows[0]["meta"].pop("question2")
    rows[1]["answer"] = None
    for r in rows:
        r["video"] = str(world / r["video"])
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _cfg(world, f"eval.sets.consistency={bad}", f"data.test={tmp_path}/test.jsonl", f"data.root={world.parent}")
    runner = SuiteRunner(cfg, ReferenceSuiteJudge(), tmp_path / "cache", tmp_path / "rejects.jsonl",
                         suites=["videochatgpt"])
    assert len(runner.sets.consistency) == 1
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert any("meta.question2" in r for r in reasons) and any("reference answer" in r for r in reasons)
    assert "generic" in runner.sets.missing and "vpref synth" in runner.sets.missing["generic"]
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        SuiteRunner(_cfg(world, f"eval.sets.generic={tmp_path}/nope.jsonl"), ReferenceSuiteJudge(), tmp_path)
