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


def make_judge(cfg: JudgeConfig, actor: str = ""):
    """The judge a config asks for (reference judge, a reward model, or an LLM judge on its backend)."""
    if cfg.kind == "reference":
        from vpref.judges.reference import ReferenceJudge

        return ReferenceJudge(actor=actor)
    if cfg.kind == "reward_model":
        from vpref.judges.reward_model import load_reward_judge

        return load_reward_judge(cfg, actor=actor)
    from vpref.judges.llm import LLMJudge

    if cfg.backend == "vllm":
        from vpref.actors.vllm_backend import VLLMChat

        lm = VLLMChat(cfg.model, cfg.dtype, cfg.vllm)
    elif cfg.backend == "openai":
        from vpref.models.openai_chat import OpenAIChat

        lm = OpenAIChat(cfg.api_base, cfg.model, cfg.api_key_env, cfg.api_concurrency, cfg.api_timeout_s,
                        cfg.api_retries)
    else:
        from vpref.models.text_lm import ChatLM

        lm = ChatLM.load(cfg.model, cfg.dtype)
    return LLMJudge(lm, cfg.rubric, cfg.show_reference, cfg.max_parse_retries, cfg.max_new_tokens,
                    cfg.retry_temperature, actor=actor)


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


def judge_items(judge, items: list[dict]) -> tuple[list[Judgment], list[Verdict]]:
    """Score response items (grouped by question) and compare pair items."""
    if hasattr(judge, "judge_items"):  # judges that batch a whole judge batch (reward models)
        return judge.judge_items(items)
    by_sample: dict[str, list[dict]] = defaultdict(list)
    verdicts = []
    for it in items:
        if it["kind"] == "pair":
            v = judge.compare(sample_view(it), ResponseView(it["first_id"], it["first_text"]),
                              ResponseView(it["second_id"], it["second_text"]))
            v.verdict_id = it["verdict_id"]
            verdicts.append(v)
        else:
            by_sample[it["sample_id"]].append(it)
    judgments = []
    for group in by_sample.values():
        judgments += judge.score(sample_view(group[0]), [ResponseView(i["response_id"], i["text"]) for i in group])
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

    def __repr__(self):
        return self.name

    def ready(self) -> str:
        return self.name

    def stats(self) -> dict:
        with self._lock:
            return {"name": self.name, "busy": self.busy, "judged": self.judged, "parse_failures": self.failures,
                    "idle_s": 0.0 if self.busy else time.monotonic() - self.idle_since, "pid": os.getpid(),
                    "node_id": ray.get_runtime_context().get_node_id()}

    def stop(self) -> None:
        self._stop.set()

    def score_items(self, items: list[dict]) -> list[Judgment]:
        """Direct scoring, outside the pull loop (evaluation, ExPO's alpha search)."""
        return judge_items(self.judge, items)[0]

    def _take(self, queue, pair_queue, batch_size: int, poll_s: float) -> list[dict]:
        """One batch: pair jobs first (finishing pairs lets their questions complete sooner), then
        responses, waiting up to `poll_s` only when there is nothing else to do."""
        items = pair_queue.get_batch(batch_size, timeout=0) if pair_queue is not None else []
        if len(items) < batch_size:
            items += queue.get_batch(batch_size - len(items), timeout=0 if items else poll_s)
        return items

    def run(self, queue, pair_queue, writer, batch_size: int, poll_s: float = 0.1) -> int:
        """Pull -> judge -> write until `stop` is called.  Returns how many items it judged."""
        self._stop.clear()
        n = 0
        while not self._stop.is_set():
            items = self._take(queue, pair_queue, batch_size, poll_s)
            if not items:
                continue
            with self._lock:
                self.busy = True
            t0 = time.perf_counter()
            try:
                judgments, verdicts = judge_items(self.judge, items)
            except Exception as e:  # never lose a batch: each item gets a failure record naming the cause
                judgments, verdicts = failed_items(self.judge, items, f"judge error: {type(e).__name__}: {e}")
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
            n += len(items)
            with self._lock:
                self.busy, self.idle_since = False, time.monotonic()
                self.judged += len(items)
                self.failures += failures
        return n
