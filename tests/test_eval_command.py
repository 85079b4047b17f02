"""`vpref eval CONFIG --checkpoint DIR --suite ...` end to end on real actors: the policy actor
answers, the suites run with the reference judge and with an LLM judge (SmolLM2-135M-Instruct
through the text path), every table names its judge, and the baseline's answers are cached."""

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_zoo(tmp_path_factory, tiny_tokenizer):
    """Two tiny checkpoints (random weights: what they say does not matter here, that every suite
    runs on it does): 'policy' (the SFT start, the win rate's baseline) and 'other'."""
    from vpref.models.tiny import build_tiny

    d = tmp_path_factory.mktemp("evalzoo")
    for seed, name in enumerate(("policy", "other")):
        build_tiny(d / name, "1m", seed=seed, tokenizer=tiny_tokenizer)
    return d


def _args(world, sft_zoo, tmp_path, *extra):
    from vpref.config import load_config

    cfg = load_config(None, [
        f"data.root={world}", f"data.train={world}/train.jsonl", f"data.dev={world}/dev.jsonl",
        f"data.test={world}/test.jsonl", f"run.out_dir={tmp_path / 'run'}",
        f"zoo=[{{name: policy, path: '{sft_zoo}/policy', policy: true, batch_size: 16, resources: {{num_cpus: 0.5}}}}]",
    ])
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml())
    return [str(cfg_path), "--set", "eval.bootstrap=200", "--set", "eval.max_samples=12", "--set",
            "eval.max_new_tokens=16", *extra]


def test_eval_command_runs_every_suite_with_the_reference_judge(ray_local, world, sft_zoo, tmp_path, capsys):
    from vpref.cli import main

    out = tmp_path / "out"
    rc = main(["eval", *_args(world, sft_zoo, tmp_path), "--checkpoint", str(sft_zoo / "other"),
               "--checkpoint", str(sft_zoo / "policy"), "--suite", "videochatgpt,zeroshot,grounded,winrate",
               "--out", str(out), "--json", str(tmp_path / "m.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    for title in ("Video-ChatGPT benchmark", "Zero-shot QA", "Caption-grounded", "Win rate against the baseline"):
        assert title in printed
    assert printed.count("judge `reference`") == 4
    rows = json.loads((tmp_path / "m.json").read_text())["checkpoints"]
    other, policy = rows[0]["eval"]["suites"], rows[1]["eval"]["suites"]
    dims = other["videochatgpt"]["dimensions"]
    assert set(dims) == {"correctness", "detail", "context", "temporal", "consistency"}
    assert all(d["n"] > 0 and d["failed"] == 0 and d["ci95"][0] <= d["value"] <= d["ci95"][1] for d in dims.values())
    assert other["winrate"]["baseline"] == str(sft_zoo / "policy")  # default: the SFT start (the policy member)
    assert other["winrate"]["questions"] == other["winrate"]["wins"] + other["winrate"]["losses"] + \
        other["winrate"]["ties"] + other["winrate"]["dropped"]
    assert policy["winrate"]["skipped"] == "the policy is the baseline"
    # the baseline's answers were generated once (for the first checkpoint) and cached
    from vpref.config import load_config
    from vpref.eval.judge import ReferenceSuiteJudge
    from vpref.eval.runner import SuiteRunner

    asks = SuiteRunner(load_config(tmp_path / "cfg.yaml"), ReferenceSuiteJudge(), tmp_path / "x").asks
    cached = sorted((out / "eval_cache").glob("answers-*.jsonl"))  # both checkpoints' answers, each once
    assert len(cached) == 2 and all(len(f.read_text().splitlines()) == len(asks) for f in cached)
    ratings = [json.loads(x) for x in (out / "checkpoint_0" / "eval_ratings.jsonl").read_text().splitlines()]
    assert {r["suite"] for r in ratings} == {"videochatgpt", "zeroshot", "grounded", "winrate"}


def test_eval_command_with_an_llm_judge(ray_local, world, sft_zoo, tmp_path, capsys):
    """SmolLM2-135M is a weak judge: the test checks that its replies go through each protocol's
    parser and become ratings or counted failures with the raw reply, not that it judges well."""
    pytest.importorskip("gguf")
    from vpref.cli import main
    from vpref.models.smollm2 import smollm2_checkpoint

    smollm2_checkpoint()  # converted once per machine (cached)
    out = tmp_path / "out"
    rc = main(["eval", *_args(world, sft_zoo, tmp_path, "--set", "eval.judge.kind=llm", "--set",
                              "eval.judge.model=smollm2", "--set", "eval.max_items=1", "--set",
                              "eval.judge.max_retries=0", "--set", "eval.max_samples=4"),
               "--checkpoint", str(sft_zoo / "other"), "--suite", "videochatgpt", "--out", str(out),
               "--json", str(tmp_path / "m.json")])
    printed = capsys.readouterr().out
    assert "judge `llm:SmolLM2-135M-Instruct`" in printed and "videochatgpt@" in printed
    ratings = [json.loads(x) for x in (out / "checkpoint_0" / "eval_ratings.jsonl").read_text().splitlines()]
    assert len(ratings) == 5  # one item per dimension (generic x 3, temporal, consistency)
    for r in ratings:
        assert r["raw"] is not None and r["attempts"] >= 1
        assert (r["ok"] and r["value"] is not None) or (not r["ok"] and "unparseable" in r["error"])
    from vpref.eval.suites import failed_share

    m = json.loads((tmp_path / "m.json").read_text())["checkpoints"][0]["eval"]["suites"]
    failed = sum(d["failed"] for d in m["videochatgpt"]["dimensions"].values())
    assert failed == sum(not r["ok"] for r in ratings if r["suite"] == "videochatgpt")
    assert rc == (1 if failed_share(m) > 0.5 else 0)  # a run whose ratings mostly failed exits non-zero
