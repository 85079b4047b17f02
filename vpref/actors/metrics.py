"""Custom metrics on the Ray dashboard / Prometheus (exported by every node's metrics agent
with a `ray_` prefix; cluster/README.md lists them and has a Grafana panel).

Counters, recorded where the work happens (generators, judges, writer), give rates in Grafana
(`rate(ray_vpref_responses_total[1m])`); they exist once incremented, and a counter of a removed
judge node disappears with the node.  The driver also sets gauges from the writer's authoritative
status every few seconds: queue depth, judge pool size, the build's responses/s and judgments/s
(means since the build started), and the build's judge failures and pairs, which read 0 rather
than missing when nothing failed.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def generator_metrics() -> dict:
    from ray.util.metrics import Counter

    return {"responses": Counter("vpref_responses_total", "answers generated", tag_keys=("model",))}


@lru_cache(maxsize=None)
def judge_metrics() -> dict:
    from ray.util.metrics import Counter, Histogram

    return {
        "judgments": Counter("vpref_judgments_total", "answers judged", tag_keys=("judge",)),
        "parse_failures": Counter("vpref_judge_parse_failures_total", "judge answers that did not parse",
                                  tag_keys=("judge",)),
        "latency": Histogram("vpref_judge_batch_seconds", "seconds to judge one pulled batch",
                             boundaries=[0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60], tag_keys=("judge",)),
    }


@lru_cache(maxsize=None)
def writer_metrics() -> dict:
    from ray.util.metrics import Counter

    return {"pairs": Counter("vpref_pairs_written_total", "chosen/rejected pairs written")}


@lru_cache(maxsize=None)
def driver_metrics() -> dict:
    from ray.util.metrics import Gauge

    return {
        "queue_depth": Gauge("vpref_queue_depth", "responses waiting for a judge"),
        "responses_per_s": Gauge("vpref_responses_per_second", "generation throughput"),
        "judgments_per_s": Gauge("vpref_judgments_per_second", "judging throughput"),
        "judges": Gauge("vpref_judges", "judge actors by state", tag_keys=("state",)),
        "judge_failures": Gauge("vpref_build_judge_failures", "failure records of this build's judge (unparseable)"),
        "pairs": Gauge("vpref_build_pairs", "chosen/rejected pairs of this build so far"),
    }


def publish_status(metrics: dict, status: dict) -> None:
    """Gauges from the writer's status of the running build."""
    metrics["judge_failures"].set(status["judge_failures"])
    metrics["pairs"].set(status["pairs"])
