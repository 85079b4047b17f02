"""The data engine on a real local Ray cluster: real generator actors running tiny Qwen2.5-VL
checkpoints on decoded mp4s, a real bounded ray.util.queue.Queue, judge actors, the Parquet
writer; faults injected by killing actors."""

import json
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray

from conftest import engine_config
from vpref.actors.writer import repair
from vpref.build import DataEngine
from vpref.data.card import write_card
from vpref.data.manifest import Sample, load_manifest
from vpref.data.schema import read_records, read_table

N = 48


@pytest.fixture(scope="module")
def engine(ray_local, world, sft_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    eng = DataEngine(engine_config(world, sft_zoo, out), out / "state")
    eng.wait_ready()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def samples(world):
    return load_manifest(world / "train.jsonl").samples[:N]


def _pair_set(out):
    return {(p.sample_id, p.chosen_response_id, p.rejected_response_id, p.chosen, p.rejected)
            for p in read_records(out, "pairs")}


def _batches(engine):
    return sum(ray.get(a.info.remote())["batches"] for reps in engine.generators.values() for a in reps)


def test_build_writes_judged_pairs_card_and_resumes_without_redoing_work(engine, samples, world, tmp_path):
    # One corrupt video among real ones: its question is set aside with the cause, the rest go on.
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00" * 300)
    todo = samples + [Sample("bad-1", str(bad), "What colour is the circle?", "The circle is red.",
                             "There is one shape. A red circle appears and stays still.", {"family": "colour"})]
    out = tmp_path / "build"
    res = engine.build(todo, out, round_=1, policy_version=0)
    st = res.status
    assert st["complete"] and st["samples"] == N and st["samples_dropped"] == 1
    assert st["expected_responses"] == st["responses"] == st["judged"] == 3 * N  # policy n=2, other n=1
    assert st["judge_failures"] == 0 and st["pairs"] > 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects] == ["bad-1"] and "corrupt.mp4" in rejects[0]["reason"]
    # Decode once: every distinct video exactly once (the corrupt one too: one attempt), whatever the zoo size.
    videos = {s.video for s in todo}
    assert res.decodes == {"decodes": len(videos), "videos": len(videos), "max_per_video": 1}

    pairs = read_records(out, "pairs")
    responses = {r.response_id: r for r in read_records(out, "responses")}
    judgments = {j.response_id: j for j in read_records(out, "judgments")}
    for p in pairs:
        assert p.chosen_score > p.rejected_score and p.margin >= 0.1
        assert responses[p.chosen_response_id].text == p.chosen and judgments[p.chosen_response_id].overall == p.chosen_score
        assert p.prompt and p.video.endswith(".mp4") and p.round == 1 and p.rubric_version.startswith("reference@")
        assert p.chosen_sampling["temperature"] in (1.0, 0.7) and set(p.chosen_scores) == {
            "correctness", "detail", "faithfulness", "concision"}
    assert {r.generator for r in responses.values()} == {"gen-policy-0", "gen-other-0"}
    # One row per id on disk: exactly once.
    raw = pq.read_table(out / "pairs")
    assert raw.num_rows == len(set(raw.column("pair_id").to_pylist())) == len(pairs)
    # Hugging Face datasets loads the tables as they are (it refuses Arrow map columns).
    import datasets

    hf = datasets.load_dataset("parquet", data_files=sorted(str(f) for f in (out / "pairs").glob("*.parquet")),
                               split="train")
    assert hf.num_rows == len(pairs) and {"prompt", "chosen", "rejected"} <= set(hf.column_names)
    row = hf[0]
    assert isinstance(row["chosen"], str) and {e["key"] for e in row["chosen_scores"]} == set(pairs[0].chosen_scores)
    for table in ("responses", "judgments"):
        assert datasets.load_dataset("parquet", data_files=str(next((out / table).glob("*.parquet"))),
                                     split="train").num_rows > 0

    stats = write_card(out, res.summary())
    assert stats["pairs"] == len(pairs) and stats["chosen_beats_rejected"] == 1.0
    assert set(stats["win_rate"]) == {"policy", "other"}
    assert "| policy |" in (out / "README.md").read_text() and (out / "card.png").is_file()

    # Re-running the same build skips everything that is done: no generation, same pairs.
    before = _batches(engine)
    again = engine.build(todo, out, round_=1, policy_version=0)
    assert _batches(engine) == before
    assert again.status["pairs"] == st["pairs"] and _pair_set(out) == {
        (p.sample_id, p.chosen_response_id, p.rejected_response_id, p.chosen, p.rejected) for p in pairs}

    # Re-pairing with another strategy works from the saved judgments alone.
    st2 = repair(out, tmp_path / "allpairs", {"strategy": "all_pairs", "min_margin": 0.1})
    assert st2["pairs"] >= st["pairs"] and st2["responses"] == st["responses"]
    assert all(p.chosen_score > p.rejected_score for p in read_records(tmp_path / "allpairs", "pairs"))


def test_killing_a_judge_a_generator_and_the_writer_mid_run_loses_and_duplicates_nothing(engine, samples, tmp_path):
    clean = engine.build(samples, tmp_path / "clean", round_=2, policy_version=0)
    assert clean.status["complete"]
    killed: dict[str, int] = {}
    ns = engine.cfg.ray.namespace  # vpref-<run name>

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and len(killed) < 3:
            try:
                writer = ray.get_actor("writer", namespace=ns)
                st = ray.get(writer.status.remote(), timeout=20)
            except Exception:
                time.sleep(0.05)
                continue
            total = st["expected_responses"]
            if "generator" not in killed and st["responses"] >= 0.15 * total:
                ray.kill(ray.get_actor("gen-policy-0", namespace=ns), no_restart=False)
                killed["generator"] = st["responses"]
            elif "judge" not in killed and st["judged"] >= 0.3 * total:
                ray.kill(ray.get_actor("judge-0", namespace=ns), no_restart=False)
                killed["judge"] = st["judged"]
            elif "writer" not in killed and "judge" in killed and st["samples_finished"] >= 1:
                ray.kill(writer, no_restart=False)
                killed["writer"] = st["pairs"]
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    faulty = engine.build(samples, tmp_path / "faulty", round_=2, policy_version=0)
    t.join(timeout=5)
    assert set(killed) == {"generator", "judge", "writer"}, killed
    assert faulty.status["complete"]
    assert _pair_set(tmp_path / "faulty") == _pair_set(tmp_path / "clean")
    for table in ("responses", "judgments", "pairs"):
        raw = pq.read_table(tmp_path / "faulty" / table)
        key = {"responses": "response_id", "judgments": "judgment_id", "pairs": "pair_id"}[table]
        assert raw.num_rows == len(set(raw.column(key).to_pylist())) == read_table(tmp_path / "clean", table).num_rows


def test_pairwise_check_judges_each_pair_in_both_orders_through_the_pair_queue(engine, samples, world, sft_zoo,
                                                                               tmp_path):
    """With the pairwise check, every candidate pair goes back to a judge in both orders (via the
    pair queue) and is kept only when both orders agree with the pointwise choice."""
    few = samples[:16]
    plain = engine.build(few, tmp_path / "plain", round_=5)
    checked_engine = DataEngine(engine_config(world, sft_zoo, tmp_path, "judge.pairwise_check=true",
                                              "run.name=pairwise"),  # its own namespace: names do not clash
                                tmp_path / "state")
    try:
        checked = checked_engine.build(few, tmp_path / "checked", round_=5)
    finally:
        checked_engine.shutdown()
    st = checked.status
    assert st["complete"] and st["verdicts"] >= st["pairs"] > 0 and st["verdicts_failed"] == 0
    verdicts = {v.verdict_id: v for v in read_records(tmp_path / "checked", "verdicts")}
    for p in read_records(tmp_path / "checked", "pairs"):
        v = verdicts[p.pair_id]
        assert p.pairwise == "consistent" and v.ok and v.consistent and v.preferred == p.chosen_response_id
        assert {v.first_id, v.second_id} == {p.chosen_response_id, p.rejected_response_id}
    # the reference judge is consistent unless tied, and the margin already drops ties
    assert _pair_set(tmp_path / "checked") == _pair_set(tmp_path / "plain") and plain.status["pairs"] == st["pairs"]


def test_actors_are_named_by_role(engine):
    named = {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}
    ns = engine.cfg.ray.namespace
    assert ns == "vpref-demo"  # one namespace per run name: two runs on one cluster never clash
    assert {(ns, "gen-policy-0"), (ns, "gen-other-0"), (ns, "judge-0"), (ns, "decoder-0"),
            (ns, "writer"), (ns, "queue")} <= named


def test_in_place_reload_keeps_the_process_changes_the_answers_and_bumps_the_version(engine, samples, sft_zoo):
    from vpref.data.video import decode_video

    policy = engine.policy_replicas()[0]
    clips = [decode_video(s.video, 8) for s in samples[:12]]
    questions = [s.question for s in samples[:12]]
    greedy = {"temperature": 0.0, "n": 1, "max_new_tokens": 16}

    def answers():
        return [c[0].text for c in ray.get(policy.generate.remote(clips, questions, greedy))]

    before, said_before = ray.get(policy.info.remote()), answers()
    out = engine.reload_policy(sft_zoo / "other", version=7)
    after, said_after = ray.get(policy.info.remote()), answers()
    assert out[0]["pid"] == before["pid"] == after["pid"] and after["version"] == 7  # same process, new weights
    assert after["path"].endswith("other") and out[0]["tensors"] > 10
    assert said_after != said_before
    engine.reload_policy(sft_zoo / "policy", version=0)
    assert answers() == said_before  # and back: the weights are exactly the checkpoint's


def test_batch_queue_moves_batches_in_one_call_and_pushes_back_when_full(ray_local):
    """get_batch takes what is there (never more than asked), put_batch waits for room."""
    from ray.util.queue import Full

    from vpref.actors.queue import BatchQueue

    q = BatchQueue(maxsize=4, actor_options={"num_cpus": 0})
    assert q.get_batch(8, timeout=0) == [] and q.get_batch(8, timeout=0.05) == []
    q.put_batch([1, 2, 3])
    assert q.get_batch(2, timeout=0) == [1, 2] and q.get_batch(8) == [3]
    q.put_batch([4, 5, 6, 7])
    with pytest.raises(Full):
        q.put_batch([8], timeout=0.1)  # full: the producer is held back
    done = threading.Event()
    t = threading.Thread(target=lambda: (q.put_batch([8, 9]), done.set()))
    t.start()
    assert not done.wait(0.3) and q.size() == 4  # still blocked, the bound holds
    taken = q.get_batch(3, timeout=0)
    t.join(timeout=10)
    assert done.is_set() and taken == [4, 5, 6]
    assert q.get_batch(8, timeout=0) == [7, 8, 9]
