"""The elastic judge pool on a multi-node cluster (ray.cluster_utils.Cluster): judges ask for a
custom `judge` resource; a judge the cluster cannot place stays pending until a judge node is
added mid-run, then starts pulling."""

import os
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import engine_config
from vpref.build import DataEngine
from vpref.data.manifest import load_manifest
from vpref.data.schema import read_records


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if ray.is_initialized():
        ray.shutdown()
    # Cluster records its address in Ray's default temp dir, which a fresh machine lacks
    from ray._common.utils import get_default_ray_temp_dir

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False,
                                                      "temp_dir": str(tmp_path_factory.mktemp("rc"))})
    c.add_node(num_cpus=1, resources={"judge": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="vpref", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_a_judge_node_added_mid_run_is_used_by_the_pool(cluster, world, sft_zoo, tmp_path):
    cfg = engine_config(world, sft_zoo, tmp_path, "judge.pool.resources={num_cpus: 0.5, custom: {judge: 1}}",
                        "judge.pool.scale_up_depth=4", "judge.pool.batch_size=2", "judge.pool.interval_s=0.2",
                        "judge.pool.idle_s=30",
                        "zoo.0.sampling.n=4")  # enough work left after the node joins for its judge to pull some
    samples = [s for split in ("train", "dev", "test") for s in load_manifest(world / f"{split}.jsonl").samples]
    engine = DataEngine(cfg, tmp_path / "state")
    engine.wait_ready()
    added, result = {}, {}

    def build():  # in a thread: Cluster.add_node must run on the main thread
        try:
            result["res"] = engine.build(samples, tmp_path / "data", round_=0)
        except Exception as e:  # surfaced by the assertions below
            result["error"] = e

    t = threading.Thread(target=build, daemon=True)
    t.start()
    deadline = time.time() + 120
    while t.is_alive() and time.time() < deadline and "node" not in added:
        if engine.pool.counts()["pending"] >= 1:  # the pool wants a judge the cluster cannot place
            added["node"] = cluster.add_node(num_cpus=1, resources={"judge": 1})
        time.sleep(0.05)
    t.join(timeout=300)
    engine.shutdown()
    assert "error" not in result, result.get("error")
    res = result["res"]
    assert "node" in added, "the pool never asked for a second judge"
    assert res.status["complete"]
    by_judge = {}
    for j in read_records(tmp_path / "data", "judgments"):
        by_judge[j.judge_actor] = by_judge.get(j.judge_actor, 0) + 1
    assert by_judge.get("judge-1", 0) > 0, by_judge  # the judge on the new node pulled work
    assert sum(by_judge.values()) == res.status["expected_responses"]
    assert ("up", "judge-1") in [(e[1], e[2]) for e in res.judge_events]
