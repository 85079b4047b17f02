"""`vpref run` as a Ray job on a local head the test starts (its own process group, loopback,
token auth as Ray 2.60 sets it up): the job is stopped in the middle of a round, submitted again,
and resumes at the first unfinished stage without redoing finished ones."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` in its own process group; stopped by signalling that group only
    (never `ray stop`, which would end every Ray process on the machine)."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="vh", dir="/tmp"))  # Ray's socket paths must stay under 108 characters
    port, dash = _free_port(), _free_port()
    # Every port of its own: another cluster on this machine (this session's local one, say) holds
    # Ray's default agent ports, and a head whose agent cannot bind runs no job.
    own = {flag: _free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                           "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
                                           "object-manager-port", "ray-client-server-port")}
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=8", f"--temp-dir={tmp}",
         *(f"--{flag}={p}" for flag, p in own.items())],
        stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # token auth is on by default for local heads
    try:
        deadline = time.time() + 180
        while True:  # ready means a job runs, not just that the dashboard answers
            probe = subprocess.run(["ray", "job", "submit", f"--address={address}", "--", sys.executable, "-c",
                                    "pass"], env=env, capture_output=True, text=True, timeout=120)
            if probe.returncode == 0:
                break
            if time.time() > deadline:
                pytest.fail(f"the Ray head runs no job: {(probe.stdout + probe.stderr)[-1500:]}")
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)  # the head exits in seconds; then its whole group is killed
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _job(address, env, verb, *args, timeout=600):
    for _ in range(10):  # the head answers "no available agent ... try again later" for a moment after a stop
        r = subprocess.run(["ray", "job", verb, f"--address={address}", *args], env=env, capture_output=True,
                           text=True, timeout=timeout)
        if "try again later" not in r.stdout + r.stderr:
            return r
        time.sleep(3)
    return r


def test_vpref_run_as_a_ray_job_resumes_after_being_stopped_mid_round(head, world, sft_zoo, tmp_path):
    address, env = head
    out = tmp_path / "run"
    cfg = {
        "run": {"name": "jobtest", "out_dir": str(out)},
        "data": {"root": str(world), "train": str(world / "train.jsonl"), "dev": str(world / "dev.jsonl"),
                 "test": str(world / "test.jsonl")},
        "zoo": [{"name": "policy", "path": str(sft_zoo / "policy"), "policy": True, "batch_size": 8,
                 "resources": {"num_cpus": 0.5}, "sampling": {"temperature": 1.0, "n": 2, "max_new_tokens": 24}},
                {"name": "other", "path": str(sft_zoo / "other"), "batch_size": 8, "resources": {"num_cpus": 0.5},
                 "sampling": {"temperature": 0.7, "n": 1, "max_new_tokens": 24}}],
        "judge": {"pool": {"min": 1, "max": 1}},
        "pairs": {"min_margin": 0.1},
        "loop": {"rounds": 1, "questions_per_round": 40, "alpha_grid": None, "alpha": 0.3},
        "dpo": {"num_workers": 1, "epochs": 1, "batch_size": 4},
        "eval": {"max_samples": 24, "max_items": 6},  # every suite runs, on 6 items per set
    }
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    entry = ["--", sys.executable, "-m", "vpref", "run", str(cfg_path)]

    job_id = f"vpref-test-{os.getpid()}-{int(time.time())}"
    first = _job(address, env, "submit", "--no-wait", f"--submission-id={job_id}", f"--working-dir={REPO}", *entry)
    assert first.returncode == 0, first.stderr
    state_file = out / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:  # stop the job as soon as round 1's data is built: mid-round
        if state_file.is_file() and "data" in json.loads(state_file.read_text())["rounds"].get("1", {}):
            break
        time.sleep(0.2)
    assert _job(address, env, "stop", job_id).returncode == 0
    state = json.loads(state_file.read_text())["rounds"]
    assert "eval" in state["0"] and "data" in state["1"] and "eval" not in state["1"]
    responses = sorted((out / "round_1" / "data" / "responses").glob("*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in responses}

    second = _job(address, env, "submit", f"--working-dir={REPO}", *entry)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    logs = second.stdout + second.stderr
    assert "round 1: data already done, skipped" in logs and "round 0: eval already done, skipped" in logs
    # quiet: vpref's lines in the job log, actors' and Ray Train's output in the run folder
    assert "round 1: dpo done in" in logs and "pid=" not in logs, logs[-3000:]
    assert "round 1: dpo done in" in (out / "logs" / "vpref.log").read_text() and (out / "logs" / "driver.log").is_file()
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "round_1" / "data" / "responses").glob("*.parquet"))} == stamps
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    r1 = metrics["rounds"][1]
    assert r1["pairs"] > 0 and r1["alpha"] == 0.3 and r1["dpo_curve"]
    assert {"qa", "all"} <= set(r1["eval"]["accuracy"]) and r1["eval"]["judge"]["overall"] is not None
    assert (out / "report.md").is_file() and (out / "scores.png").is_file() and (out / "dpo.png").is_file()
