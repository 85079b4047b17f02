"""Custom metrics on the Ray dashboard / Prometheus (exported with a `ray_` prefix).

Counters give rates in Grafana (`rate(ray_vpref_responses_total[1m])`); the driver also sets
gauges of the queue depth and of the current responses/s and judgments/s.
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
        "decodes": Gauge("vpref_video_decodes", "videos decoded in this build"),
    }
