"""Bad inputs and faults, each with its exit code, its message (the input and the fix) and proof
that nothing already written is lost or duplicated.  Real components at small sizes: the tiny
zoo on real mp4s, real judge actors and queues, an LLM judge behind real HTTP on loopback, real
decode child processes, real file locks held by other processes.

The five patterns (issue 14): 1 an error that does not crash an actor, 2 failure records that a
re-run retries, 3 exit codes that tell the truth, 4 output folders with an owner, 5 checks
before starting.  Commands run in-process (`vpref.cli.main`); the Ray cases share one cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml

import vpref
from conftest import engine_config
from vpref.cli import exit_code, main
from vpref.data.manifest import Sample, load_manifest
from vpref.data.schema import read_records, read_table
from vpref.errors import FolderConflict, WorkFailed

KEYS = {"responses": "response_id", "judgments": "judgment_id", "pairs": "pair_id"}


def _unique_rows(folder: Path, table: str) -> int:
    """Rows on disk of a table, asserting one per id (exactly once)."""
    files = sorted((folder / table).glob("*.parquet"))
    if not files:
        return 0
    ids = [i for f in files for i in pq.read_table(f).column(KEYS[table]).to_pylist()]
    assert len(ids) == len(set(ids)), f"{table}: duplicate ids on disk"
    return len(ids)


def _config_file(tmp_path: Path, world: Path, zoo: Path, **sections) -> Path:
    cfg = {
        "run": {"name": "faults-cli", "out_dir": str(tmp_path / "run")},
        "data": {"root": str(world), "train": str(world / "train.jsonl"), "dev": str(world / "dev.jsonl"),
                 "test": str(world / "test.jsonl")},
        "sft": {"out": str(zoo)},
        "zoo": [{"name": "policy", "path": str(zoo / "policy"), "policy": True, "batch_size": 8,
                 "resources": {"num_cpus": 0.5}, "sampling": {"n": 2, "max_new_tokens": 16}},
                {"name": "other", "path": str(zoo / "other"), "batch_size": 8, "resources": {"num_cpus": 0.5},
                 "sampling": {"temperature": 0.7, "max_new_tokens": 16}}],
        "build": {"out": str(tmp_path / "build")},
        "loop": {"alpha_grid": None},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


# =========================================================================== 5: checks before starting


@pytest.mark.parametrize("case, argv, key, fix", [
    ("zoo checkpoint missing", ["build-data", "{cfg}", "--set", "zoo.1.path={tmp}/nope"], "zoo.1.path", "vpref sft"),
    ("judge checkpoint missing", ["build-data", "{cfg}", "--set", "judge.kind=llm", "--set", "judge.model={tmp}/nojudge"],
     "judge.model", "judge.backend=openai"),
    ("no CPUs", ["run", "{cfg}", "--set", "ray.num_cpus=0"], "ray.num_cpus", "at least"),
    ("more Train workers than CPUs", ["run", "{cfg}", "--set", "dpo.num_workers=16"], "dpo.num_workers", "<= 6"),
    ("Train workers 0", ["run", "{cfg}", "--set", "dpo.num_workers=0"], "dpo.num_workers", "at least 1 worker"),
    ("negative max_samples", ["build-data", "{cfg}", "--set", "build.max_samples=-1"], "build.max_samples",
     "greater than or equal to 1"),
    ("questions_per_round 0", ["run", "{cfg}", "--set", "loop.questions_per_round=0"], "loop.questions_per_round",
     "greater than or equal to 1"),
    ("negative frame size", ["build-data", "{cfg}", "--set", "data.frame_size=-8"], "data.frame_size",
     "greater than or equal to 1"),
    ("manifest missing", ["build-data", "{cfg}", "--set", "data.train={tmp}/none.jsonl"], "data.train", "vpref synth"),
    ("synth --n 0", ["synth", "--out", "{tmp}/w", "--n", "0"], "--n", "greater than or equal to 3"),
    ("synth negative size", ["synth", "--out", "{tmp}/w", "--size", "-4"], "--size", "greater than or equal to 32"),
    ("pairs from a folder that is no build", ["pairs", "{tmp}", "--out", "{tmp}/p"], str, "vpref build-data"),
    ("eval checkpoint missing", ["eval", "{cfg}", "--checkpoint", "{tmp}/nockpt"], "--checkpoint", "vpref sft"),
])
def test_bad_config_and_missing_inputs_stop_before_anything_starts(case, argv, key, fix, world, sft_zoo, tmp_path,
                                                                    capsys):
    cfg = _config_file(tmp_path, world, sft_zoo)
    argv = [a.format(cfg=cfg, tmp=tmp_path) for a in argv]
    t0 = time.perf_counter()
    code, err = _run_cli(capsys, *argv)
    assert code == 2, err
    assert (str(tmp_path) if key is str else key) in err and fix in err, err
    assert time.perf_counter() - t0 < 20  # found before any actor or Train job is waited for
    assert not (tmp_path / "run" / "state.json").exists() and not (tmp_path / "build" / "responses").exists()


def test_every_preflight_problem_is_one_line_with_key_value_and_fix(world, sft_zoo, tmp_path, capsys):
    cfg = _config_file(tmp_path, world, sft_zoo)
    code, err = _run_cli(capsys, "run", str(cfg), "--set", "zoo.0.path=/nope/policy", "--set",
                         f"data.test={tmp_path}/t.jsonl", "--set", "ray.num_cpus=1")
    lines = [ln.strip() for ln in err.splitlines()[1:]]
    assert code == 2 and len(lines) == 3, err
    assert lines[0].startswith("data.test = ") and "vpref synth" in lines[0]
    assert lines[1].startswith("zoo.0.path = '/nope/policy'") and "run `vpref sft CONFIG` first" in lines[1]
    assert lines[2].startswith("ray.num_cpus = 1") and "need 2 at once" in lines[2]


# ---------------------------------------------------------------- manifests: one bad row, not the file


def test_a_bad_row_rejects_that_row_with_its_reason_not_the_manifest(world, tmp_path):
    video = next((world / "videos").glob("*.mp4"))
    root = tmp_path / "root"
    (root / "videos").mkdir(parents=True)
    shutil.copy(video, root / "videos" / "ok.mp4")
    (root / "videos" / "dir.mp4").mkdir()  # a directory named like a video
    (root / "videos" / "loop1.mp4").symlink_to(root / "videos" / "loop2.mp4")
    (root / "videos" / "loop2.mp4").symlink_to(root / "videos" / "loop1.mp4")
    rows = [{"id": "a", "video": "videos/ok.mp4", "question": "q?"},
            {"id": "b", "video": "videos/dir.mp4", "question": "q?"},
            {"id": "c", "video": "videos/loop1.mp4", "question": "q?"}]
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(1, b'{"id": "latin", "video": "videos/ok.mp4", "question": "caf\xe9?"}')  # Latin-1, not UTF-8
    (root / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    m = load_manifest(root / "m.jsonl")
    assert [s.id for s in m.samples] == ["a"] and m.counts() == {"rows": 4, "ok": 1, "rejected": 3}
    why = {r.row: r.reason for r in m.rejects}
    assert "line 2 is not valid UTF-8 (byte 0xe9" in why[2]
    assert "'videos/dir.mp4' is a directory" in why[3]
    assert "'videos/loop1.mp4' cannot be resolved: symlink loop" in why[4]


# =========================================================================== 4: output folders with an owner


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the folder's lock (it prints once it has it)."""
    code = (f"import sys, time; from vpref.folders import FolderLock; FolderLock({str(folder)!r}, 'run').acquire(); "
            f"print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(vpref.__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_command_on_a_locked_folder_says_who_holds_it_and_a_dead_holder_is_taken_over(tmp_path, capsys,
                                                                                                world, sft_zoo):
    from vpref.folders import FolderLock

    cfg = _config_file(tmp_path, world, sft_zoo)
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        code, err = _run_cli(capsys, "run", str(cfg))
        assert code == 4 and f"pid {holder.pid} on {socket.gethostname()}" in err and "run.out_dir" in err, err
        assert "since 20" in err and "wait for it to finish, or use another folder" in err
        # the second run wrote nothing but its own log lines (the refusal) under logs/
        assert sorted(p.name for p in run_dir.iterdir()) == [".vpref.lock", "logs"]
        assert not (run_dir / "state.json").exists() and not (run_dir / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel releases the lock, the file stays
        holder.wait()
    with FolderLock(run_dir, "run"):
        assert json.loads((run_dir / ".vpref.lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().err
    # a holder that released the lock (a finished or interrupted command) is not "gone": no takeover
    subprocess.run([sys.executable, "-c", f"from vpref.folders import FolderLock; "
                                          f"FolderLock({str(run_dir)!r}, 'run').acquire().release()"], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(vpref.__file__).resolve().parents[1])})
    assert (run_dir / ".vpref.lock").read_text() == ""
    with FolderLock(run_dir, "run"):
        pass
    assert "taking over" not in capsys.readouterr().err


def test_resuming_with_changed_settings_is_refused_and_config_yaml_keeps_the_finished_stages_settings(
        tmp_path, capsys, world, sft_zoo):
    from vpref.config import load_config
    from vpref.loop import RunState

    cfg_path = _config_file(tmp_path, world, sft_zoo, pairs={"min_margin": 0.1})
    cfg = load_config(cfg_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    state = RunState(run_dir, cfg)  # round 1's data stage finished with min_margin 0.1
    state.put(0, "eval", {"policy": "p", "metrics": {}})
    state.put(1, "data", {"pairs": 3, "summary": {}})
    before = (run_dir / "config.yaml").read_text()
    code, err = _run_cli(capsys, "run", str(cfg_path), "--set", "pairs.min_margin=0.7")
    assert code == 4, err
    assert "round 1 data: pairs.min_margin 0.1 -> 0.7" in err and "Use another run.out_dir" in err
    assert "round 0 eval" not in err  # the pair margin is not an input of the evaluation
    assert (run_dir / "config.yaml").read_text() == before and json.loads((run_dir / "state.json").read_text())[
        "rounds"]["1"]["data"]["pairs"] == 3
    # Settings no finished stage depends on may change (more rounds, other Ray resources).
    RunState(run_dir, load_config(cfg_path, ["loop.rounds=5", "ray.num_cpus=16"])).check_resume()
    # New data under the same paths is a change too.
    changed = tmp_path / "world2"
    shutil.copytree(world, changed)
    (changed / "train.jsonl").write_text((world / "train.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(FolderConflict, match="the data changed"):
        RunState(run_dir, load_config(cfg_path, [f"data.train={changed}/train.jsonl"])).check_resume()


def test_zoo_paths_follow_sft_out_and_checkpoints_know_what_trained_them(world, sft_zoo, tmp_path, capsys):
    from vpref.config import load_config
    from vpref.train.sft import checkpoint_mismatches, run_sft

    assert [m.path for m in load_config(None, [f"sft.out={tmp_path}/s"]).zoo] == [
        f"{tmp_path}/s/{n}" for n in ("policy", "strong", "noisy")]
    base = [f"data.root={world}", f"data.train={world}/train.jsonl", f"sft.out={sft_zoo}", "sft.batch_size=8",
            "sft.lr=3e-3", "sft.warmup_steps=5",
            "sft.members=[{name: policy, size: 0.2m, steps: 60}, {name: other, size: 0.2m, steps: 30, seed: 1}]"]
    assert checkpoint_mismatches(load_config(None, base)) == {}  # the fixture's own settings and world
    more = checkpoint_mismatches(load_config(None, base + ["sft.members.0.steps=61"]))
    assert set(more) == {"policy"} and "was trained from other member" in more["policy"]
    with pytest.raises(FolderConflict, match="does not overwrite them"):  # `vpref sft` keeps them too
        run_sft(load_config(None, base + ["sft.members.0.steps=61"]))
    # `vpref demo` refuses to evaluate checkpoints of another world or settings (and to overwrite them).
    code, err = _run_cli(capsys, "demo", *sum((["--set", o] for o in base + [
        f"synth.out={world}", "synth.n=30", "synth.seed=7", "sft.members.0.steps=61"]), []))
    assert code == 4 and "not trained from this demo's world and settings" in err and "--fresh" in err, err
    code, err = _run_cli(capsys, "demo", "--set", f"synth.out={world}", "--set", "synth.size=72")
    assert code == 4 and "synth.size 64 there, 72 asked" in err and "vpref demo --fresh" in err, err


# =========================================================================== the data engine under faults


@pytest.fixture(scope="module")
def engine(ray_local, world, sft_zoo, tmp_path_factory):
    from vpref.build import DataEngine

    out = tmp_path_factory.mktemp("faults")
    cfg = engine_config(world, sft_zoo, out, "run.name=faults", "build.stall_timeout_s=30",
                        "ray.placement_timeout_s=4", "zoo.0.sampling.max_new_tokens=12",
                        "zoo.1.sampling.max_new_tokens=12")
    eng = DataEngine(cfg, out / "state")
    eng.wait_ready()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def train(world):
    return load_manifest(world / "train.jsonl").samples


class _Config:
    """Build settings for one case on the shared engine (its actors stay as they are)."""

    def __init__(self, engine, *overrides):
        from vpref.config import load_config

        self.engine, self.saved = engine, engine.cfg
        data = engine.cfg.model_dump(mode="json")
        self.cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in data.items()] + list(overrides))

    def __enter__(self):
        self.engine.cfg = self.cfg
        return self.cfg

    def __exit__(self, *exc):
        self.engine.cfg = self.saved


def _batches(engine) -> int:
    return sum(ray.get(a.info.remote())["batches"] for reps in engine.generators.values() for a in reps)


# ---------------------------------------------------------------- 1: errors that do not crash an actor


def test_a_judge_loop_that_keeps_failing_stops_the_build_with_the_cause_and_a_rerun_completes(engine, train, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "judgments").write_text("not a folder")  # every write of the judgments table fails
    t0 = time.perf_counter()
    with pytest.raises(WorkFailed) as e:
        engine.build(train[:8], out, round_=1)
    assert exit_code(e.value) == 3 and time.perf_counter() - t0 < 60  # before: the build waited forever
    msg = str(e.value)
    assert "every judge keeps failing in its pull loop" in msg and "FileExistsError" in msg and "judgments" in msg
    assert "run the same command again" in msg
    generated = _unique_rows(out, "responses")
    assert generated == 24  # durable before judging: nothing generated is lost
    (out / "judgments").unlink()
    before = _batches(engine)
    res = engine.build(train[:8], out, round_=1)
    assert res.status["complete"] and res.status["judged"] == 24 and _batches(engine) == before  # no regeneration
    assert _unique_rows(out, "responses") == 24 and _unique_rows(out, "judgments") == 24


def _thin_video(folder: Path, name: str = "thin") -> Path:
    from vpref.data.video import write_video

    path = folder / f"{name}.mp4"  # 2 x 420 pixels: the video preprocessor refuses an aspect ratio over 200
    write_video(path, np.random.default_rng(0).integers(0, 255, (8, 2, 420, 3), dtype=np.uint8))
    return path


def test_a_bad_item_fails_alone_its_batch_neighbours_are_answered_and_reruns_retry_it_a_bounded_number_of_times(
        engine, train, tmp_path):
    good = train[:10]
    huge = Sample("huge", good[0].video, "What colour " * 16667, "The circle is red.", good[0].caption,
                  {"family": "colour"})  # 200,004 characters, ~50,000 tokens: far past the tiny model's context
    thin = Sample("thin", str(_thin_video(tmp_path)), "What colour is the circle?", "The circle is red.",
                  good[0].caption, {"family": "colour"})
    todo = good[:4] + [huge] + good[4:8] + [thin] + good[8:]
    out = tmp_path / "b"
    with _Config(engine, "build.max_attempts=2"):
        res = engine.build(todo, out, round_=2)
        st = res.status
        assert st["complete"] and st["generation_errors"] == 6  # 2 questions x (policy n=2 + other n=1)
        errors = {r.response_id: r.error for r in read_records(out, "responses") if r.error}
        assert {rid.split(":")[1] for rid in errors} == {"huge", "thin"}
        assert all("tokens exceeds the model's context of 4,096 tokens" in e for rid, e in errors.items() if ":huge:" in rid)
        assert all("aspect ratio must be smaller than 200" in e for rid, e in errors.items() if ":thin:" in rid)
        assert st["judged"] == 30 and st["judge_failures"] == 0 and st["pairs"] > 0  # the neighbours: all answered
        pairs = {p.sample_id for p in read_records(out, "pairs")}
        assert not pairs & {"huge", "thin"}
        kept = {(r.response_id, r.text) for r in read_records(out, "responses") if not r.error}

        # A re-run tries the failed items again (attempt 2 of build.max_attempts=2), alone...
        before = _batches(engine)
        engine.build(todo, out, round_=2)
        assert _batches(engine) - before == 4  # huge and thin, once per member, one question per call
        assert read_table(out / "retried", "responses").num_rows == 6
        # ... and then no more: their failure records stay, nothing else is redone or duplicated.
        before = _batches(engine)
        res3 = engine.build(todo, out, round_=2)
        assert _batches(engine) == before and res3.status["generation_errors"] == 6
        assert {(r.response_id, r.text) for r in read_records(out, "responses") if not r.error} == kept
        assert _unique_rows(out, "responses") == 36 and _unique_rows(out, "judgments") == 30


def test_a_decode_child_that_crashes_mid_decode_is_retried_not_a_dropped_video(engine, train):
    pool = engine.decoders
    actor = pool.actors[0]
    video = train[0].video
    ray.get(actor.decode.remote(video))  # the child exists now
    pid = ray.get(actor.child_pid.remote())
    os.kill(pid, signal.SIGSTOP)  # it will be busy with the next decode ...
    ref = actor.decode.remote(video)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)  # ... and die in the middle of it
    clip = ray.get(ref, timeout=60)
    assert clip.frames.shape[0] == engine.cfg.data.num_frames
    assert ray.get(actor.counts.remote())["crashes"] == 1 and ray.get(actor.child_pid.remote()) != pid


def test_no_judge_can_be_placed_the_build_stops_naming_what_was_asked_and_what_the_cluster_has(engine, train,
                                                                                               tmp_path):
    from vpref.actors.pool import JudgePool

    saved = engine.pool
    with _Config(engine, "judge.pool.resources={num_cpus: 0.5, custom: {judge_gpu: 1}}") as cfg:
        engine.pool = JudgePool(cfg.judge, namespace="vpref-faults-unplaceable")
        try:
            t0 = time.perf_counter()
            with pytest.raises(WorkFailed) as e:
                engine.build(train[:4], tmp_path / "b", round_=3)
        finally:
            engine.pool.shutdown()
            engine.pool = saved
    msg = str(e.value)
    assert exit_code(e.value) == 3 and time.perf_counter() - t0 < 40  # before: waited forever
    assert "items wait, but a judge could not be placed within 4s" in msg and "{CPU: 0.5, judge_gpu: 1}" in msg
    assert "no node of the cluster has that much" in msg and "the cluster has {CPU: 8" in msg
    assert _unique_rows(tmp_path / "b", "responses") == 12  # what was generated is kept for the re-run


@pytest.mark.parametrize("case", ["zero pairs", "every generation failed"])
def test_systemic_failure_exits_non_zero_naming_what_failed_and_what_decides_it(case, engine, train, tmp_path):
    if case == "zero pairs":
        todo, overrides = train[:4], ["pairs.min_margin=4.5"]
        expect = ["no pairs: none of the 4 questions", "pairs.min_margin=4.5"]
    else:
        todo = [Sample(f"thin{i}", str(_thin_video(tmp_path, f"thin{i}")), "What colour is the circle?",
                       "The circle is red.", train[0].caption, {"family": "colour"}) for i in range(2)]
        overrides = []
        expect = ["zoo member 'policy' produced nothing: 4 of 4 generations failed: ValueError: absolute aspect ratio",
                  "zoo member 'other' produced nothing: 2 of 2"]
    with _Config(engine, *overrides):
        with pytest.raises(WorkFailed) as e:
            engine.build(todo, tmp_path / "b", round_=4)
    assert exit_code(e.value) == 3 and all(x in str(e.value) for x in expect), str(e.value)
    assert _unique_rows(tmp_path / "b", "responses") == 3 * len(todo)  # every record kept, once


def test_a_build_folder_of_other_inputs_is_refused_and_fresh_starts_it_again(engine, train, tmp_path):
    from vpref.folders import clear_build

    out = tmp_path / "b"
    engine.build(train[:4], out, round_=5)
    pairs = _unique_rows(out, "pairs")
    with pytest.raises(FolderConflict, match=r"holds a build made from other inputs \(questions differ\).*--fresh"):
        engine.build(train[4:8], out, round_=5)
    assert _unique_rows(out, "pairs") == pairs and _unique_rows(out, "responses") == 12  # untouched
    (out / "mine.txt").write_text("not vpref's")
    assert "responses" in clear_build(out) and (out / "mine.txt").is_file()  # --fresh removes only vpref's files
    res = engine.build(train[4:8], out, round_=5)
    assert {p.sample_id for p in read_records(out, "pairs")} <= {s.id for s in train[4:8]} and res.status["complete"]


def test_vpref_pairs_never_replaces_the_build_it_reads_or_another_build(engine, train, tmp_path, capsys):
    src, other = tmp_path / "src", tmp_path / "other"
    engine.build(train[:4], src, round_=6)
    engine.build(train[4:8], other, round_=6)
    snapshot = {p: p.stat().st_mtime_ns for d in (src, other) for p in d.rglob("*.parquet")}
    for dst in (src, src / "sub", other):
        code, err = _run_cli(capsys, "pairs", str(src), "--out", str(dst), "--min-margin", "0.1")
        assert code == 4 and "choose a new" in err, err
    assert {p: p.stat().st_mtime_ns for d in (src, other) for p in d.rglob("*.parquet")} == snapshot
    code, err = _run_cli(capsys, "pairs", str(src), "--out", str(tmp_path / "new"), "--min-margin", "0.1")
    assert code == 0 and _unique_rows(tmp_path / "new", "pairs") >= _unique_rows(src, "pairs")


# ---------------------------------------------------------------- 2 + 3: a judge endpoint that is down, then back


class _Endpoint:
    """An OpenAI-compatible chat endpoint on a fixed loopback port that can be down (nothing
    listens) or up (rubric answers whose scores depend on the answer, so pairs have margins)."""

    def __init__(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.requests = 0
        self.server = None
        self.refuse = None  # a prompt containing this text is answered with HTTP 400

    def up(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                if outer.refuse and outer.refuse in body["messages"][0]["content"]:
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                answer = body["messages"][0]["content"].split("Answer to judge:")[-1].split("\n")[0]
                score = 1 + sum(map(ord, answer)) % 5
                text = f"Relevance: {score}\nAccuracy: {score}\nClarity: 3\nRationale: scored."
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def test_a_judge_error_on_one_question_fails_only_that_questions_judgments():
    from vpref.actors.judge import judge_items
    from vpref.judges.llm import LLMJudge
    from vpref.models.openai_chat import OpenAIChat

    endpoint = _Endpoint()
    endpoint.up()
    endpoint.refuse = "How many shapes"
    try:
        judge = LLMJudge(OpenAIChat(endpoint.url, "stub", retries=0), "mmaipv", max_parse_retries=0)
        items = [{"kind": "response", "response_id": f"r{i}", "text": f"answer {i}", "sample_id": sid, "question": q,
                  "answer": None, "caption": "One red circle.", "family": None}
                 for i, (sid, q) in enumerate([("s1", "What colour is it?"), ("s1", "What colour is it?"),
                                               ("s2", "How many shapes are there?"), ("s3", "Which way?")])]
        judgments, _ = judge_items(judge, items)  # before: the whole batch raised (then all four failed)
    finally:
        endpoint.close()
    assert [(j.response_id, j.ok) for j in judgments] == [("r0", True), ("r1", True), ("r2", False), ("r3", True)]
    assert judgments[2].failure == "endpoint" and "HTTP 400" in judgments[2].error and endpoint.url in judgments[2].error


def test_a_judge_endpoint_that_is_down_fails_the_build_and_a_rerun_after_it_recovers_retries_only_the_failures(
        ray_local, world, sft_zoo, train, tmp_path):
    from vpref.build import DataEngine

    endpoint = _Endpoint()  # down: nothing listens on its port yet
    cfg = engine_config(world, sft_zoo, tmp_path, "run.name=faults-endpoint", "judge.kind=llm",
                        "judge.backend=openai", f"judge.api_base={endpoint.url}", "judge.model=stub-judge",
                        "judge.api_retries=0", "judge.max_parse_retries=0", "judge.rubric=mmaipv",
                        "judge.api_breaker_cooldown_s=0.5",  # the breaker opened on the dead endpoint
                        f"judge.api_cache_dir={tmp_path / 'cache'}",
                        "judge.pool.max=1", "zoo.0.sampling.max_new_tokens=12")
    eng = DataEngine(cfg, tmp_path / "state", members=["policy"])
    out = tmp_path / "b"
    try:
        with pytest.raises(WorkFailed) as e:
            eng.build(train[:8], out, round_=1)
        msg = str(e.value)
        assert exit_code(e.value) == 3 and "16 of 16 judgments failed" in msg and endpoint.url in msg
        assert "build.max_judge_failure_rate" in msg and "failed judgments are retried" in msg
        assert "refused" in msg.lower(), msg
        # Evaluation on a dead endpoint: failure records and a clear stop, not a traceback.
        items = [{"kind": "response", "response_id": f"eval:{s.id}", "text": "A red circle.", "sample_id": s.id,
                  "question": s.question, "answer": s.answer, "caption": s.caption, "family": s.family}
                 for s in train[:3]]
        with pytest.raises(WorkFailed, match="evaluation: 3 of 3 judgments failed"):
            eng.judge_items(items)

        endpoint.up()
        time.sleep(1.0)  # past the breaker's cooldown: its next request is the trial
        res = eng.build(train[:8], out, round_=1)
        st = res.status
        assert st["complete"] and st["judged"] == 16 and st["judge_failures"] == 0 and st["pairs"] > 0
        assert endpoint.requests == 16  # exactly the failed ones, once each
        assert _unique_rows(out, "responses") == 16 and _unique_rows(out, "judgments") == 16
        history = read_table(out / "retried", "judgments").to_pylist()
        assert len(history) == 16 and not any(r["ok"] for r in history)  # the failure records are kept
        assert len(eng.judge_items(items)) == 3 and endpoint.requests == 19
    finally:
        eng.shutdown()
        endpoint.close()


@pytest.mark.parametrize("case", ["corrupt checkpoint", "unplaceable"])
def test_a_zoo_member_that_cannot_start_or_be_placed_stops_the_command_naming_it(case, ray_local, world, sft_zoo,
                                                                                   tmp_path):
    from vpref.build import DataEngine

    if case == "corrupt checkpoint":
        bad = tmp_path / "other"
        shutil.copytree(sft_zoo / "other", bad)
        (bad / "model.safetensors").write_bytes(b"\0" * 64)  # passes the pre-flight check (config.json is there)
        extra, expect = [f"zoo.1.path={bad}"], ["zoo member 'other' (gen-other-0) could not start", "zoo.1.path"]
    else:
        extra = ["zoo.1.resources={num_cpus: 0.5, custom: {gen_gpu: 1}}"]
        expect = ["generator gen-other-0 could not be placed within 4s", "{CPU: 0.5, gen_gpu: 1}",
                  "no node of the cluster has that much", "zoo.1.resources"]
    cfg = engine_config(world, sft_zoo, tmp_path, f"run.name=faults-{case.split()[0]}", "ray.placement_timeout_s=4",
                        *extra)
    eng = DataEngine(cfg, tmp_path / "state", members=["other"])
    try:
        with pytest.raises(WorkFailed) as e:
            eng.build(load_manifest(world / "train.jsonl").samples[:4], tmp_path / "b")
    finally:
        eng.shutdown()
    assert exit_code(e.value) == 3 and all(x in str(e.value) for x in expect), str(e.value)
    assert not (tmp_path / "b" / "responses").exists()  # stopped before any work


def test_an_evaluation_split_whose_questions_were_all_rejected_stops_the_run_naming_it(world, sft_zoo, tmp_path,
                                                                                      capsys, ray_local):
    root = tmp_path / "data"
    shutil.copytree(world, root)
    rows = [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()][:6]
    for r in rows:  # every video of the test split is undecodable
        (root / r["video"]).write_bytes(b"\0" * 300)
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config_file(tmp_path, root, sft_zoo, run={"name": "faults-evalsplit"})
    data = yaml.safe_load(cfg.read_text())
    data["zoo"] = data["zoo"][:1]
    cfg.write_text(yaml.safe_dump(data))
    code, err = _run_cli(capsys, "run", str(cfg))
    rejects = tmp_path / "run" / "rejects.jsonl"
    assert code == 2, err  # before: TypeError: unsupported format string passed to NoneType.__format__
    assert f"the test split ({root}/test.jsonl, data.test) has no usable questions: all 6 were rejected" in err
    assert str(rejects) in err and len(rejects.read_text().splitlines()) == 6
