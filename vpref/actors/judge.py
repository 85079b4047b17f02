"""JudgeActor: pulls batches of responses from the shared queue, scores them, hands the
judgments to the writer.  It runs a pull loop (`run`) on one thread while `stats` and `stop`
answer on another, so the pool can watch and retire it without interrupting a batch.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict

import ray

from vpref.config import JudgeConfig
from vpref.data.schema import Judgment, Verdict, judgment_id
from vpref.judges.base import ResponseView, SampleView
from vpref.judges.registry import make_judge  # noqa: F401  (its home is the judge registry)


def response_item(response_id: str, text: str, sample_id: str, question: str, answer: str | None = None,
                  caption: str | None = None, family: str | None = None, video: str | None = None) -> dict:
    """A queue item for the judges: one response and what a judge may know of its question (never
    the frames; the video's path, for judges that read it: a video reward model)."""
    return {"kind": "response", "response_id": response_id, "text": text, "sample_id": sample_id,
            "question": question, "answer": answer, "caption": caption, "family": family, "video": video}


def pair_item(verdict_id: str, sample_id: str, first: tuple[str, str], second: tuple[str, str], question: str,
              answer: str | None = None, caption: str | None = None, family: str | None = None) -> dict:
    """A queue item for a pairwise check: two (response id, text) to compare in both orders."""
    return {"kind": "pair", "verdict_id": verdict_id, "sample_id": sample_id, "first_id": first[0],
            "first_text": first[1], "second_id": second[0], "second_text": second[1], "question": question,
            "answer": answer, "caption": caption, "family": family}


def sample_view(item: dict) -> SampleView:
    return SampleView(item["sample_id"], item["question"], item.get("answer"), item.get("caption"), item.get("family"))


def failed_items(judge, items: list[dict], error: str) -> tuple[list[Judgment], list[Verdict]]:
    """Explicit failure records for a batch the judge could not handle at all (an endpoint down)."""
    js = [Judgment(judgment_id(i["response_id"], judge.name), i["response_id"], i["sample_id"], judge.name, judge.rubric,
                   judge.rubric_version, ok=False, error=error, judge_actor=getattr(judge, "actor", ""))
          for i in items if i["kind"] == "response"]
    vs = [Verdict(i["verdict_id"], i["sample_id"], i["first_id"], i["second_id"], None, None, ok=False,
                  consistent=False, error=error, judge=judge.name) for i in items if i["kind"] == "pair"]
    return js, vs


def _why(e: Exception) -> str:
    return f"judge error: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"


def judge_items(judge, items: list[dict]) -> tuple[list[Judgment], list[Verdict]]:
    """Score response items (grouped by question) and compare pair items.  Never raises for what a
    judge raises: the question (or pair) it was scoring gets failure records naming the cause, and
    the other items of the batch are scored as usual."""
    if hasattr(judge, "judge_items"):  # judges that batch a whole judge batch (reward models)
        try:
            return judge.judge_items(items)
        except Exception as e:  # the batch as one unit failed: fall back to per question/pair isolation
            from vpref.utils import log

            log(f"{getattr(judge, 'name', 'judge')}: a batched judge call failed ({_why(e)}); judging item by item")
    by_sample: dict[str, list[dict]] = defaultdict(list)
    verdicts = []
    for it in items:
        if it["kind"] == "pair":
            try:
                v = judge.compare(sample_view(it), ResponseView(it["first_id"], it["first_text"]),
                                  ResponseView(it["second_id"], it["second_text"]))
                v.verdict_id = it["verdict_id"]
                verdicts.append(v)
            except Exception as e:
                verdicts += failed_items(judge, [it], _why(e))[1]
        else:
            by_sample[it["sample_id"]].append(it)
    judgments = []
    for group in by_sample.values():
        try:
            judgments += judge.score(sample_view(group[0]), [ResponseView(i["response_id"], i["text"]) for i in group])
        except Exception as e:
            judgments += failed_items(judge, group, _why(e))[0]
    return judgments, verdicts


class JudgeActor:
    def __init__(self, cfg: dict, actor_name: str):
        from vpref.actors.metrics import judge_metrics
        from vpref.utils import quiet_libraries

        quiet_libraries()
        self.cfg = JudgeConfig.model_validate(cfg)
        self.name = actor_name
        self.judge = make_judge(self.cfg, actor=actor_name)
        self.metrics = judge_metrics()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.busy = False
        self.idle_since = time.monotonic()
        self.judged = 0
        self.failures = 0
        self.loop_errors = 0  # pull-loop iterations that failed (queue or writer calls), and in a row
        self.errors_in_a_row = 0
        self.last_error: str | None = None

    def __repr__(self):
        return self.name

    def ready(self) -> str:
        return self.name

    def stats(self) -> dict:
        with self._lock:
            return {"name": self.name, "busy": self.busy, "judged": self.judged, "parse_failures": self.failures,
                    "idle_s": 0.0 if self.busy else time.monotonic() - self.idle_since, "pid": os.getpid(),
                    "node_id": ray.get_runtime_context().get_node_id(), "loop_errors": self.loop_errors,
                    "errors_in_a_row": self.errors_in_a_row, "last_error": self.last_error}

    def stop(self) -> None:
        self._stop.set()

    def score_items(self, items: list[dict]) -> list[Judgment]:
        """Direct scoring, outside the pull loop (evaluation, ExPO's alpha search); a judge that
        fails gives failure records, never an exception."""
        return judge_items(self.judge, items)[0]

    def _take(self, queue, pair_queue, batch_size: int, poll_s: float) -> list[dict]:
        """One batch: pair jobs first (finishing pairs lets their questions complete sooner), then
        responses, waiting up to `poll_s` only when there is nothing else to do."""
        items = pair_queue.get_batch(batch_size, timeout=0) if pair_queue is not None else []
        if len(items) < batch_size:
            items += queue.get_batch(batch_size - len(items), timeout=0 if items else poll_s)
        return items

    def run(self, queue, pair_queue, writer, batch_size: int, poll_s: float = 0.1) -> int:
        """Pull -> judge -> write until `stop` is called.  Returns how many items it judged.

        Nothing that goes wrong in one iteration ends the loop: the judge's own errors become
        failure records (`judge_items`); a queue or writer call that raises is counted in `stats`
        (the driver stops the build when every judge keeps failing), the batch in hand goes back
        on its queue, and the loop carries on after a short pause."""
        self._stop.clear()
        n = 0
        while not self._stop.is_set():
            items = []
            try:
                items = self._take(queue, pair_queue, batch_size, poll_s)
                if items:
                    n += self._judge_batch(items, writer)
                    with self._lock:
                        self.errors_in_a_row = 0
            except Exception as e:
                self._loop_error(e, items, queue, pair_queue)
        return n

    def _loop_error(self, e: Exception, items: list[dict], queue, pair_queue) -> None:
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        if hasattr(e, "cause") and e.cause is not None:  # a RayTaskError: name the remote error itself
            msg = f"{type(e.cause).__name__}: {str(e.cause).strip().splitlines()[-1][:300]}"
        with self._lock:
            self.busy, self.idle_since = False, time.monotonic()
            self.loop_errors += 1
            self.errors_in_a_row += 1
            self.last_error = msg
            pause = min(5.0, 0.2 * 2 ** (self.errors_in_a_row - 1))
        if self.errors_in_a_row == 1:
            print(f"{self.name}: pull loop error (carrying on): {msg}", flush=True)
        try:  # give the batch back, so it is not waited for until the driver finds it missing
            for q, kind in ((queue, "response"), (pair_queue, "pair")):
                back = [i for i in items if i["kind"] == kind]
                if back and q is not None:
                    q.put_batch(back, timeout=1.0)
        except Exception:
            pass  # the driver re-enqueues what the writer never got
        self._stop.wait(pause)

    def _judge_batch(self, items: list[dict], writer) -> int:
        with self._lock:
            self.busy = True
        t0 = time.perf_counter()
        judgments, verdicts = judge_items(self.judge, items)
        if judgments:
            ray.get(writer.add_judgments.remote(judgments))
        if verdicts:
            ray.get(writer.add_verdicts.remote(verdicts))
        failures = sum(not j.ok for j in judgments) + sum(not v.ok for v in verdicts)
        tags = {"judge": self.name}
        self.metrics["judgments"].inc(len(judgments) + len(verdicts), tags=tags)
        if failures:
            self.metrics["parse_failures"].inc(failures, tags=tags)
        self.metrics["latency"].observe(time.perf_counter() - t0, tags=tags)
        with self._lock:
            self.busy, self.idle_since = False, time.monotonic()
            self.judged += len(items)
            self.failures += failures
        return len(items)
