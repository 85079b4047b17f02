"""The cluster layer under Ray's real autoscaler (v2), on one machine.

A head is started the way KubeRay starts one, with an autoscaling config whose worker types
mirror cluster/kuberay/raycluster.yaml: `gpu-workers` (label vpref/pool=main, 1 logical GPU, at
most 1 node) and `judge` (label vpref/pool=judge, 1 logical GPU and the `judge` resource, 0..2
nodes).  Ray's fake multi-node provider turns each launched "instance" into a real raylet on
this machine, so the real autoscaler decides when nodes come and go.  The head runs in its own
process group, with every port its own, and is stopped by signalling that group only
(`AutoscalingCluster.start()/shutdown()` would run `ray stop --force`, ending every Ray process on
the machine).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray

from conftest import engine_config

FAKE_HEAD = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
IDLE_S = 6  # the autoscaler removes a node idle this long
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def autoscaling_config(gcs_address: str) -> dict:
    provider = {
        "type": "external",  # has built-in defaults: the wheel lacks fake_multi_node/example.yaml
        "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
        "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
        "gcs_address": gcs_address, "launch_multiple": True, "head_node_id": FAKE_HEAD,
    }
    types = {
        "ray.head.default": {"resources": {"CPU": 4}, "node_config": {}, "max_workers": 0},
        "gpu-workers": {"resources": {"CPU": 1, "GPU": 1}, "labels": {"vpref/pool": "main"},
                        "node_config": {}, "min_workers": 0, "max_workers": 1},
        "judge": {"resources": {"CPU": 1, "GPU": 1, "judge": 1}, "labels": {"vpref/pool": "judge"},
                  "node_config": {}, "min_workers": 0, "max_workers": 2},
    }
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files")
    return {"cluster_name": "vpref-test", "max_workers": 3, "idle_timeout_minutes": IDLE_S / 60,
            "upscaling_speed": 10, "provider": provider, "available_node_types": types,
            "head_node_type": "ray.head.default", "auth": {}, "file_mounts": {},
            "file_mounts_sync_continuously": False, **{k: [] for k in empty}}


def stop_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL, to the process group this test created (and nothing else)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            time.sleep(0.5)
            os.killpg(proc.pid, 0)  # members left (raylets of fake nodes)?
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


@pytest.fixture(scope="module")
def autoscaling_head():
    if ray.is_initialized():
        ray.shutdown()
    tmp = Path(tempfile.mkdtemp(prefix="va", dir="/tmp"))  # Ray's socket paths must stay short
    gcs = free_port()
    address = f"127.0.0.1:{gcs}"
    (tmp / "autoscaler.json").write_text(json.dumps(autoscaling_config(address)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD,
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD, "RAY_metrics_report_interval_ms": "1000"}
    ports = {flag: free_port() for flag in ("ray-client-server-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "metrics-export-port",
                                            "runtime-env-agent-port", "node-manager-port", "object-manager-port")}
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
         f"--autoscaling-config={tmp / 'autoscaler.json'}", f"--temp-dir={tmp}", "--include-dashboard=false",
         *(f"--{flag}={p}" for flag, p in ports.items())],
        env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # the driver's gauges too
    try:
        deadline = time.time() + 120
        while True:
            try:
                ray.init(address=address, namespace="vpref-autoscale", log_to_driver=False)
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"the autoscaling head did not start: {(tmp / 'head.log').read_text()[-2000:]}")
                time.sleep(0.5)
        from ray.autoscaler.v2 import utils as v2_utils

        v2_utils.cached_is_autoscaler_v2 = None  # request_resources asks this cluster, not an earlier one
        yield tmp
    finally:
        os.environ.pop("RAY_metrics_report_interval_ms", None)
        ray.shutdown()
        stop_group(proc)
        end_processes(proc.pid, str(tmp))  # stragglers of its session or naming its temp dir
        assert not own_processes(proc.pid, str(tmp))


class Watch(threading.Thread):
    """Samples the alive nodes by pool label (and, with scrape=True, every node's Prometheus
    endpoint) in the background."""

    def __init__(self, scrape: bool = False, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.t0, self.every_s, self.scrape = time.time(), every_s, scrape
        self.nodes: list[tuple[float, int, int]] = []  # (seconds, judge nodes, gpu-workers nodes)
        self.series: dict[tuple[str, str], float] = {}  # (node, series) -> largest value seen
        self.last: dict[str, float] = {}  # series -> value at the latest scrape
        self.first_seen: dict[str, float] = {}  # metric name -> seconds when first scraped
        self.stopped = threading.Event()
        self.start()

    def run(self):
        last_scrape = 0.0
        while not self.stopped.is_set():
            alive = [n for n in ray.nodes() if n["Alive"]]
            pools = [n["Labels"].get("vpref/pool") for n in alive]
            self.nodes.append((round(time.time() - self.t0, 2), pools.count("judge"), pools.count("main")))
            if self.scrape and time.time() - last_scrape >= 1.0:
                last_scrape = time.time()
                for n in alive:
                    self._scrape(n)
            time.sleep(self.every_s)

    def _scrape(self, node) -> None:
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            return  # a node going away
        for line in text.splitlines():
            if line.startswith("ray_vpref_"):
                series, value = line.rsplit(" ", 1)
                key = (node["NodeID"], _strip_instance_tags(series))
                self.series[key] = max(self.series.get(key, 0.0), float(value))
                self.last[key[1]] = float(value)
                self.first_seen.setdefault(series.split("{")[0], round(time.time() - self.t0, 2))

    def stop(self):
        self.stopped.set()
        self.join(timeout=10)

    def total(self, name: str, **tags) -> float:
        """Sum over nodes and workers of the largest value seen of `name` (with these tags)."""
        want = [f'{k}="{v}"' for k, v in tags.items()]
        return sum(v for (_, s), v in self.series.items()
                   if s.split("{")[0] == name and all(w in s for w in want))

    def latest(self, name: str) -> float:
        (value,) = [v for s, v in self.last.items() if s.split("{")[0] == name]  # a driver gauge: one series
        return value

    def most(self, name: str) -> float:
        return max((v for (_, s), v in self.series.items() if s.split("{")[0] == name), default=float("nan"))

    def changes(self) -> list[tuple[float, int, int]]:
        """The node timeline, only where a count changed."""
        out = []
        for t, j, g in self.nodes:
            if not out or out[-1][1:] != (j, g):
                out.append((t, j, g))
        return out


def _strip_instance_tags(series: str) -> str:
    # one series per worker process: keep WorkerId, drop what is the same for all
    return re.sub(r'(SessionName|Version|otel_scope_\w+|NodeAddress|Component)="[^"]*",?', "", series)


def wait_for(cond, timeout_s: float, what: str, every_s: float = 0.25):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


@pytest.mark.slow
def test_judge_nodes_come_and_go_with_the_queue_under_the_real_autoscaler(autoscaling_head, world, sft_zoo,
                                                                          tmp_path):
    """A real build with judge.pool.min 0: the pool's pending judge makes the autoscaler launch a
    judge node, a backed-up queue a second one; judges there pull work; when the build is done
    the pool releases them and the autoscaler removes both nodes.  Meanwhile every node's
    Prometheus endpoint is scraped for vpref's metrics."""
    from vpref.build import DataEngine
    from vpref.data.manifest import load_manifest
    from vpref.data.schema import read_records

    cfg = engine_config(world, sft_zoo, tmp_path, "judge.pool.min=0", "judge.pool.max=2",
                        "judge.pool.resources={num_cpus: 0.5, custom: {judge: 1}}", "ray.judges_select_pool=true",
                        # one item per pull: a judge is slower than the zoo, so the queue keeps a backlog
                        "judge.pool.scale_up_depth=4", "judge.pool.batch_size=1", "judge.pool.interval_s=0.2",
                        "judge.pool.idle_s=30", "zoo.0.sampling.n=4")
    # 159 questions x 5 answers: generation lasts long enough for the second judge node to join
    samples = [s for split in ("train", "dev", "test") for s in load_manifest(world / f"{split}.jsonl").samples]
    engine = DataEngine(cfg, tmp_path / "state")
    engine.wait_ready()
    assert ray.cluster_resources().get("judge", 0) == 0  # no judge node before the build
    watch = Watch(scrape=True)
    try:
        t_build = time.time() - watch.t0
        res = engine.build(samples, tmp_path / "data", round_=0, progress_every_s=1.0)
        t_done = time.time() - watch.t0
        assert not engine.pool.actors  # min 0: the pool released every judge at the end of the build
        wait_for(lambda: watch.nodes[-1][1] == 0, 90, "the autoscaler to remove the idle judge nodes")
        time.sleep(1.5)  # one more scrape of the head's endpoint
    finally:
        watch.stop()
        engine.shutdown()
    timeline = watch.changes()
    print(f"\nnode timeline (s, judge nodes, gpu nodes): {timeline}; build {t_build:.1f}-{t_done:.1f}s;"
          f" pool events {[(round(t - watch.t0, 1), kind, name) for t, kind, name in res.judge_events]}")

    # node counts over time: 0 -> 1 -> 2 judge nodes during the build, back to 0 after it
    judge_counts = [j for _, j, _ in timeline]
    assert judge_counts[0] == 0 and judge_counts[-1] == 0
    assert max(judge_counts) == 2, timeline
    first_up = next(t for t, j, _ in timeline if j >= 1)
    second_up = next(t for t, j, _ in timeline if j >= 2)
    gone = next(t for t, j, _ in timeline if t > second_up and j == 0)
    assert t_build < first_up < second_up < t_done < gone
    assert all(g == 0 for _, _, g in timeline)  # CPU work never made the autoscaler start GPU nodes
    # pool events: one judge up, then (queue backed up, judge-0 placed) the second
    assert [(kind, name) for _, kind, name in res.judge_events][:2] == [("up", "judge-0"), ("up", "judge-1")]
    t_up1 = res.judge_events[1][0] - watch.t0
    assert res.judge_events[0][0] - watch.t0 < first_up and t_up1 < second_up  # each judge asked before its node
    # judges on the launched nodes pulled the work (only judge nodes offer `judge`)
    assert res.status["complete"]
    by_judge: dict[str, int] = {}
    for j in read_records(tmp_path / "data", "judgments"):
        by_judge[j.judge_actor] = by_judge.get(j.judge_actor, 0) + 1
    assert sum(by_judge.values()) == res.status["expected_responses"]
    assert by_judge.get("judge-0", 0) > 0 and by_judge.get("judge-1", 0) > 0, by_judge

    # metrics scraped from the nodes' Prometheus endpoints during the build
    st = res.status
    assert watch.total("ray_vpref_responses_total") == st["responses"] == st["expected_responses"]
    assert watch.total("ray_vpref_responses_total", model="policy") == 4 * len(samples)
    assert watch.total("ray_vpref_judgments_total") == st["judged"]
    assert watch.total("ray_vpref_pairs_written_total") == st["pairs"] > 0
    assert watch.most("ray_vpref_build_pairs") == st["pairs"]
    assert watch.most("ray_vpref_build_judge_failures") == st["judge_failures"] == 0
    assert 4 <= watch.most("ray_vpref_queue_depth") <= cfg.build.queue_size  # it backed up, within its bound
    for rate, total in (("ray_vpref_responses_per_second", st["responses"]),
                        ("ray_vpref_judgments_per_second", st["judged"])):  # the build's mean rate at its end
        assert watch.latest(rate) == pytest.approx(total / res.seconds, rel=0.05), (rate, watch.latest(rate))
    assert watch.most('ray_vpref_judges') == 2
    assert watch.first_seen["ray_vpref_queue_depth"] < t_done  # seen during the build, not only after


@pytest.mark.slow
def test_gpu_work_overflowing_its_group_never_lands_on_a_judge_node(autoscaling_head, world, sft_zoo, tmp_path):
    """Two one-GPU generators, and the gpu-workers group holds one: the second stays pending
    although a pre-warmed judge node has a free GPU, and the autoscaler starts no judge node for
    it.  A plain GPU actor without vpref's label selector does land there (the old failure)."""
    from vpref.build import DataEngine
    from vpref.cluster import prewarm_judges

    cfg = engine_config(world, sft_zoo, tmp_path, "judge.pool.min=0",
                        "judge.pool.resources={num_cpus: 0.5, num_gpus: 1, custom: {judge: 1}}",
                        "zoo.0.resources={num_cpus: 0.5, num_gpus: 1}", "zoo.1.resources={num_cpus: 0.5, num_gpus: 1}",
                        "ray.prewarm_judges=1")
    watch = Watch()
    engine = None
    try:
        with prewarm_judges(cfg):  # what DataEngine.build does first, with ray.prewarm_judges
            wait_for(lambda: watch.nodes and watch.nodes[-1][1] == 1, 60, "the pre-warmed judge node")
            engine = DataEngine(cfg, tmp_path / "state")
            placed = {name: reps[0].info.remote() for name, reps in engine.generators.items()}
            ready = wait_for(lambda: ray.wait(list(placed.values()), num_returns=1, timeout=0)[0], 60,
                             "one generator on the gpu-workers node")
            time.sleep(4 * 1.0 + 2)  # four autoscaler rounds: time enough to (wrongly) add a judge node
            assert len(ray.wait(list(placed.values()), num_returns=2, timeout=0)[0]) == 1  # the other waits
            free = {n["Labels"].get("vpref/pool"): _available(n["NodeID"]).get("GPU", 0)
                    for n in ray.nodes() if n["Alive"]}
            assert free.get("judge") == 1 and free.get("main") == 0, free  # judge GPU free, yet unused
            assert watch.nodes[-1][1:] == (1, 1)  # no second judge node for the overflow

            @ray.remote(num_gpus=1, num_cpus=0)  # no label selector (defined here: shipped by value)
            class Plain:
                def pool(self):
                    return ray.get_runtime_context().get_node_labels().get("vpref/pool")

            plain = Plain.remote()
            assert ray.get(plain.pool.remote(), timeout=30) == "judge"
            ray.kill(plain)
            assert ready
        timeline_at_release = time.time() - watch.t0
        engine.shutdown()
        engine = None
        wait_for(lambda: watch.nodes[-1][1:] == (0, 0), 90, "the released judge node and the gpu node to go")
    finally:
        watch.stop()
        if engine is not None:
            engine.shutdown()
    timeline = watch.changes()
    print(f"\nnode timeline (s, judge nodes, gpu nodes): {timeline}; pre-warm released at {timeline_at_release:.1f}s")
    assert max(j for _, j, _ in timeline) == 1 and max(g for _, _, g in timeline) == 1


def _available(node_id: str) -> dict:
    from ray._private.state import available_resources_per_node

    return available_resources_per_node().get(node_id, {})


# --------------------------------------------------------------------------- cluster/README.md's local path


def readme_block(marker: str, readme: str = "cluster/README.md") -> str:
    """The ```bash block after `<!-- marker ... -->` in a README."""
    text = (REPO / readme).read_text()
    m = re.search(rf"<!-- {marker}[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"{readme} has no ```bash block after <!-- {marker} -->"
    return m.group(1)


def own_processes(session: int, marker: str) -> list[int]:
    """PIDs of processes in the session this test created, or naming its temp dir (Ray workers)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            sid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[3])
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if sid == session or marker in cmd:
            pids.append(int(p.name))
    return pids


def end_processes(session: int, marker: str) -> None:
    for sig, grace_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
        for pid in own_processes(session, marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while own_processes(session, marker) and time.time() < deadline:
            time.sleep(0.5)


@pytest.mark.slow
def test_cluster_readme_local_walk_runs_as_written_on_a_fresh_machine(tmp_path):
    """cluster/README.md's local path, command by command, with a fresh HOME (no token yet):
    generate the token, start the head, submit a vpref job with token auth, reach the dashboard.
    Changed for the test only: the ports (the head's are all its own), its temp dir, and the
    head's address pinned to loopback."""
    block = readme_block("local-walk")
    assert readme_block("local-walk", "README.md") == block  # README.md's "On a cluster" runs the same commands
    tmp = Path(tempfile.mkdtemp(prefix="vw", dir="/tmp"))  # short: Ray's socket paths
    home = tmp / "home"
    home.mkdir()
    dash = free_port()
    pins = " ".join(f"--{flag}={free_port()}" for flag in (
        "port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port"))
    script = block.replace("8265", str(dash))
    assert len(re.findall(r"(?m)^ray start --head", script)) == 1
    script = re.sub(r"(?m)^(ray start --head[^\n#]*?)\s*$", rf"\1 {pins} --temp-dir={tmp} --node-ip-address=127.0.0.1",
                    script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)  # a fresh machine: no ~/.ray/auth_token
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-xc", script], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        token = (home / ".ray" / "auth_token").read_text().strip()
        assert len(token) >= 32  # `ray get-auth-token --generate` wrote it
        # the job ran vpref on the cluster, which has token auth on
        assert "succeeded" in out and "judges (" in out and "1 node(s)" in out, out[-3000:]
        assert '"ray_version"' in out or "ray_version" in out, out[-2000:]  # the dashboard answered with the token
        with pytest.raises(urllib.error.HTTPError) as e:  # and refuses a client without it
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=10)
        assert e.value.code == 401
    finally:
        end_processes(proc.pid, str(tmp))
    assert not own_processes(proc.pid, str(tmp))


# --------------------------------------------------------------------------- fast checks (no cluster)

# Fields of the KubeRay 1.5.1 CRDs the manifests may use (a field only a later CRD knows, such as
# the group `priority` of 1.7 or authOptions.secretName of 1.6, is an unknown-field error on 1.5).
KUBERAY_151 = {
    "RayCluster.spec": {"rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                        "workerGroupSpecs", "headServiceAnnotations", "suspend"},
    "authOptions": {"mode"},
    "autoscalerOptions": {"version", "upscalingMode", "idleTimeoutSeconds", "resources", "image", "imagePullPolicy",
                          "env", "envFrom", "volumeMounts", "securityContext"},
    "headGroupSpec": {"serviceType", "rayStartParams", "template", "resources", "labels", "headService",
                      "enableIngress"},
    "workerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
                        "template", "resources", "labels", "numOfHosts", "scaleStrategy", "suspend"},
    "RayJob.spec": {"entrypoint", "runtimeEnvYAML", "submissionMode", "shutdownAfterJobFinishes",
                    "ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds", "rayClusterSpec",
                    "clusterSelector", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId",
                    "metadata", "submitterPodTemplate", "suspend"},
}


def _manifest(name: str) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all((REPO / "cluster" / "kuberay" / name).read_text()) if d]


def _check_cluster_spec(spec: dict, where: str) -> None:
    from vpref.config import RayConfig

    d = RayConfig()
    assert set(spec) <= KUBERAY_151["RayCluster.spec"], (where, set(spec) - KUBERAY_151["RayCluster.spec"])
    assert set(spec["authOptions"]) <= KUBERAY_151["authOptions"] and spec["authOptions"]["mode"] == "token"
    assert set(spec["autoscalerOptions"]) <= KUBERAY_151["autoscalerOptions"]
    assert spec["autoscalerOptions"]["version"] == "v2"  # label selectors need autoscaler v2
    assert set(spec["headGroupSpec"]) <= KUBERAY_151["headGroupSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for g in groups.values():
        assert set(g) <= KUBERAY_151["workerGroupSpec"], (where, g["groupName"], set(g) - KUBERAY_151["workerGroupSpec"])
        assert not {"resources", "labels"} & set(g["rayStartParams"])  # the operator refuses both ways at once
        for v in g["template"]["spec"]["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] == "vpref-shared"
    # the labels vpref's placement selects on (ray.pool_label / ray.judge_pool defaults)
    assert groups["judge"]["labels"] == {d.pool_label: d.judge_pool} and groups["judge"]["resources"] == {"judge": "1"}
    assert groups["gpu-workers"]["labels"][d.pool_label] != d.judge_pool


def test_manifests_keep_the_volume_apart_label_the_pools_and_stay_within_kuberay_151_fields():
    pvc = _manifest("pvc.yaml")
    assert [d["kind"] for d in pvc] == ["PersistentVolumeClaim"] and pvc[0]["metadata"]["name"] == "vpref-shared"
    cluster, job = _manifest("raycluster.yaml"), _manifest("rayjob.yaml")
    assert [d["kind"] for d in cluster] == ["RayCluster"] and [d["kind"] for d in job] == ["RayJob"]  # no PVC
    _check_cluster_spec(cluster[0]["spec"], "raycluster.yaml")
    assert set(job[0]["spec"]) <= KUBERAY_151["RayJob.spec"]
    _check_cluster_spec(job[0]["spec"]["rayClusterSpec"], "rayjob.yaml")


def test_grafana_panels_and_the_metrics_table_name_metrics_vpref_exports():
    defined = set(re.findall(r'"(vpref_\w+)"', (REPO / "vpref" / "actors" / "metrics.py").read_text()))
    dash = json.loads((REPO / "cluster" / "grafana-vpref.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_(vpref_\w+)", e)}
    readme = (REPO / "cluster" / "README.md").read_text()
    documented = set(re.findall(r"`ray_(vpref_\w+)", readme))
    assert used and used <= defined, used - defined
    assert documented <= defined, documented - defined
    assert defined <= documented, f"metrics missing from cluster/README.md: {defined - documented}"


def test_placement_keeps_non_judge_work_off_judge_nodes_and_respects_placement_groups():
    from ray.util.placement_group import PlacementGroup
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from vpref.actors import placement
    from vpref.config import ConfigError, RayConfig, load_config

    try:
        placement.configure(RayConfig())
        assert placement.main_options() == {"label_selector": {"vpref/pool": "!judge"}}
        assert placement.judge_options() == {}  # judges: their custom resource, unless judges_select_pool
        pg_opts = {"scheduling_strategy": PlacementGroupSchedulingStrategy(PlacementGroup.empty())}
        assert placement.main_options(pg_opts) == {}  # bundles carry it (bundle_label_selector)
        assert placement.bundle_selectors(placement.main_selector(), 2) == [{"vpref/pool": "!judge"}] * 2
        placement.configure(RayConfig(judges_select_pool=True, pool_label="example.com/pool", judge_pool="j"))
        assert placement.judge_options() == {"label_selector": {"example.com/pool": "j"}}
        assert placement.main_selector() == {"example.com/pool": "!j"}
        placement.configure(RayConfig(pool_label=None))
        assert placement.main_options() == {} and placement.bundle_selectors(placement.main_selector(), 2) is None
    finally:
        placement.configure(RayConfig())
    for bad in ("ray.pool_label=not a label", "ray.judge_pool=-judge", "ray.pool_label=ray.io/pool"):
        with pytest.raises(ConfigError, match="label"):
            load_config(None, [bad])


def test_prewarm_requests_judge_nodes_for_the_build_and_always_releases_them(monkeypatch):
    import ray.autoscaler.sdk as sdk

    from vpref.cluster import prewarm_judges, prewarmed
    from vpref.config import load_config

    calls = []
    monkeypatch.setattr(sdk, "request_resources", lambda **kw: calls.append(kw))
    cfg = load_config(None, ["ray.prewarm_judges=5", "judge.pool.max=3",
                             "judge.pool.resources={num_cpus: 4, num_gpus: 1, custom: {judge: 1}}"])

    class Engine:
        def __init__(self):
            self.cfg = cfg

        @prewarmed
        def build(self, fail):
            assert calls[-1]["bundles"] == [{"CPU": 4, "GPU": 1, "judge": 1}] * 3  # capped at judge.pool.max
            if fail:
                raise RuntimeError("the build failed")
            return "built"

    assert Engine().build(False) == "built" and calls[-1] == {"bundles": []}
    with pytest.raises(RuntimeError):
        Engine().build(True)
    assert calls[-1] == {"bundles": []} and len(calls) == 4  # released after the failure too
    with prewarm_judges(load_config(None, [])):  # prewarm_judges 0: no request at all
        pass
    assert len(calls) == 4


def _screen(written: str) -> list[str]:
    """What a terminal shows after `written` (\\r + erase-line rewrite the current line)."""
    return [line.split("\r\x1b[K")[-1].split("] ", 1)[-1] for line in written.split("\n") if line]


def test_progress_keeps_one_line_per_stage_on_a_terminal_and_throttles_elsewhere(monkeypatch):
    import io

    from vpref import utils

    class TTY(io.StringIO):
        def isatty(self):
            return True

    term = utils._Term()
    monkeypatch.setattr(utils, "_term", term)
    term.out = TTY()
    utils.progress("round 1 data", "round 1: data ...", transient=True)
    for i in range(3):
        utils.progress("build", f"build: generated {i}/2")
    utils.log("build: re-enqueueing 3 responses")
    utils.progress("round 1 data", "round 1: data done in 1s")
    utils.progress("round 1 dpo", "round 1: dpo ...", transient=True)
    utils.progress("round 1 dpo", "round 1: dpo done in 5s")
    utils.progress("round 1 eval", "round 1: eval ...", transient=True)
    utils.log("round 1: QA accuracy 0.4")  # scrolls above the running stage's line
    utils.progress("round 1 eval", "round 1: eval done in 1s")
    utils.log("report: runs/x/report.md")
    assert _screen(term.out.getvalue()) == [
        "build: generated 2/2", "build: re-enqueueing 3 responses", "round 1: data done in 1s",
        "round 1: dpo done in 5s", "round 1: QA accuracy 0.4", "round 1: eval done in 1s", "report: runs/x/report.md"]

    term.out = io.StringIO()  # a pipe (Ray job logs, CI): the first state, then the last one only
    term.last_print.clear()
    for i in range(5):
        utils.progress("sft policy", f"sft policy: step {i}")
    utils.progress("sft strong", "sft strong: step 0")
    lines = term.out.getvalue().splitlines()
    assert [line.split("] ")[1] for line in lines] == ["sft policy: step 0", "sft policy: step 4",
                                                       "sft strong: step 0"]


def test_internal_output_goes_to_the_run_folder_and_vpref_lines_to_the_terminal(tmp_path):
    import sys

    code = (
        "import logging, os, sys, warnings\n"
        "from vpref.utils import keep_internal_logs, log, say\n"
        f"keep_internal_logs({str(tmp_path)!r})\n"
        "os.write(2, b'C++ core worker: noise\\n')\n"
        "logging.getLogger('ray.train').warning('train noise')\n"
        "warnings.warn('library noise')\n"
        "ds = logging.getLogger('DeepSpeed'); ds.propagate = False\n"  # as deepspeed sets up its logger
        "ds.addHandler(logging.StreamHandler(sys.stdout)); ds.warning('stdout noise')\n"
        "print('stray print noise')\n"
        "say('table row')\n"
        "log('round 1: data done')\n"
        "raise ValueError('boom')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    kept = (tmp_path / "driver.log").read_text()
    assert r.stdout == "table row\n" and "round 1: data done" in r.stderr and "ValueError: boom" in r.stderr
    assert all(s in kept for s in ("C++ core worker: noise", "train noise", "library noise", "stdout noise",
                                   "stray print noise", "ValueError: boom"))
    assert "noise" not in r.stderr
