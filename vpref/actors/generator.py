"""GeneratorActor: hosts one zoo member's model behind a backend.

Its methods map onto backend calls (the OpenRLHF vllm_engine shape): `generate` for direct use
(captions, evaluation), `generate_batch` for the data engine (generate -> persist through the
writer -> put on the shared queue, where a full queue blocks it: backpressure), `load_weights`
for the in-place reload each round.  The current weights are recorded in a small state file, so
a restarted actor comes back with the weights it had, not the ones it was created with.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from vpref.actors.backends import GenRequest, make_backend
from vpref.actors.judge import response_item
from vpref.config import ZooMember
from vpref.data.schema import Response, response_id


@dataclass
class WorkItem:
    sample_id: str
    question: str
    answer: str | None
    caption: str | None
    family: str | None
    video: str
    clip: object  # ObjectRef of a vpref.data.video.Clip (decoded once, shared)


@dataclass
class WorkBatch:
    member: str
    index: int
    round: int
    seed: int
    items: list[WorkItem] = field(default_factory=list)


class GeneratorActor:
    def __init__(self, member: dict, actor_name: str, state_file: str | None = None):
        from vpref.utils import quiet_libraries
        from vpref.actors.metrics import generator_metrics

        quiet_libraries()
        self.member = ZooMember.model_validate(member)
        self.name = actor_name
        self.state_file = Path(state_file) if state_file else None
        self.version = 0
        path = self.member.path
        if self.state_file and self.state_file.is_file():  # restarted: come back as we were
            state = json.loads(self.state_file.read_text())
            path, self.version = state["path"], state["version"]
        self.member.path = path
        self.backend = make_backend(self.member)
        self.metrics = generator_metrics()
        self.batches = 0  # generate_batch calls served by this process

    def __repr__(self):  # Ray prefixes this actor's log lines with it
        return self.name

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        return {"name": self.name, "version": self.version, "pid": os.getpid(), "batches": self.batches,
                "node_id": ray.get_runtime_context().get_node_id(), **self.backend.info()}

    def load_weights(self, checkpoint_dir: str, version: int) -> dict:
        """Swap in new weights in place (same process, same engine) and bump the version."""
        out = self.backend.load_weights(checkpoint_dir)
        self.member.path, self.version = checkpoint_dir, version
        if self.state_file:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"path": checkpoint_dir, "version": version}))
            os.replace(tmp, self.state_file)
        return {"actor": self.name, "pid": os.getpid(), "version": version, **out}

    def sleep(self, level: int = 1) -> dict:
        """Release the GPU (vLLM sleep mode) while training uses it."""
        if not hasattr(self.backend, "sleep"):
            raise NotImplementedError(f"{self.name}: the {self.member.backend} backend has no sleep mode")
        return self.backend.sleep(level)

    def wake_up(self, tags: list[str] | None = None):
        if not hasattr(self.backend, "wake_up"):
            raise NotImplementedError(f"{self.name}: the {self.member.backend} backend has no sleep mode")
        return self.backend.wake_up(tags)

    def score_pairs(self, rows: list[dict], data: dict, batch_size: int) -> list[tuple]:
        """Sequence log-probs of pairs under the weights held now (reference log-probs)."""
        from vpref.config import DataConfig
        from vpref.train.dpo import score_pairs

        if not hasattr(self.backend, "vlm"):
            raise NotImplementedError(f"{self.name}: the {self.member.backend} backend does not score sequences")
        return score_pairs(self.backend.vlm, rows, DataConfig.model_validate(data), batch_size)

    def generate(self, clips: list, questions: list[str], sampling: dict | None = None, seed: int = 0) -> list:
        """Answer questions about clips (Clip objects or refs to them) -> completions per question."""
        from vpref.config import SamplingConfig

        clips = [ray.get(c) if isinstance(c, ray.ObjectRef) else c for c in clips]
        s = SamplingConfig.model_validate(sampling) if sampling else self.member.sampling
        reqs = [GenRequest(c.frames, c.sampled_fps, q) for c, q in zip(clips, questions)]
        return self.backend.generate(reqs, s, seed)

    def context_errors(self, requests: list[GenRequest]) -> list[str | None]:
        """Why each request cannot be answered by this model (its prompt does not fit the context),
        or None.  A prompt past the context never gives an answer: on CPU a 200,000-character
        question made the process allocate 23 GB and die; vLLM refuses the whole batch."""
        vlm = getattr(self.backend, "vlm", None)
        if vlm is None:
            return [None] * len(requests)  # other backends refuse such prompts themselves (the batch is then split)
        text_cfg = vlm.model.config.get_text_config()
        limit = getattr(text_cfg, "max_position_embeddings", None)
        if not limit:
            return [None] * len(requests)
        new = self.member.sampling.max_new_tokens
        out = []
        cache = self.__dict__.setdefault("_video_prompt_tokens", {})
        for r in requests:
            # the prompt's length without the question, once per clip shape (it runs the processor),
            # plus the question's tokens: exact up to a merge at the boundary
            key = (tuple(r.frames.shape), r.fps)
            if key not in cache:
                cache[key] = len(vlm.prompt_ids("", r.frames, r.fps))
            n = cache[key] + len(vlm.tokenizer(r.question, add_special_tokens=False)["input_ids"])
            out.append(None if n + new <= limit else
                       f"prompt of {n:,} tokens + {new} new tokens exceeds the model's context of {limit:,} tokens "
                       f"(question of {len(r.question):,} characters)")
        return out

    def generate_batch(self, batch: WorkBatch, queue, writer) -> dict:
        """Data-engine work: generate every sample of the batch, persist, enqueue for judging.  A
        question this model cannot answer (see `context_errors`) gets an error record; the rest go on."""
        t0 = time.perf_counter()
        self.batches += 1
        s = self.member.sampling
        clips = ray.get([it.clip for it in batch.items])
        reqs = [GenRequest(c.frames, c.sampled_fps, it.question) for c, it in zip(clips, batch.items)]
        errors = self.context_errors(reqs)
        good = [i for i, e in enumerate(errors) if e is None]
        gen = self.backend.generate([reqs[i] for i in good], s, batch.seed) if good else []
        outs = [None] * len(reqs)
        for i, comps in zip(good, gen):
            outs[i] = comps
        responses, items = [], []
        for it, comps, err in zip(batch.items, outs, errors):
            if err is not None:
                responses += [Response(
                    response_id(batch.round, it.sample_id, self.member.name, k), it.sample_id, batch.round,
                    self.member.name, self.member.path, self.member.policy, self.version, k, "", 0, "error",
                    s.temperature, s.top_p, batch.seed, error=err, generator=self.name) for k in range(s.n)]
                continue
            for k, c in enumerate(comps):
                r = Response(
                    response_id=response_id(batch.round, it.sample_id, self.member.name, k),
                    sample_id=it.sample_id, round=batch.round, model=self.member.name, model_path=self.member.path,
                    is_policy=self.member.policy, policy_version=self.version, index=k, text=c.text,
                    num_tokens=c.num_tokens, finish_reason=c.finish_reason, temperature=s.temperature,
                    top_p=s.top_p, seed=batch.seed, generator=self.name,
                )
                responses.append(r)
                items.append(response_item(r.response_id, r.text, it.sample_id, it.question, it.answer,
                                           it.caption, it.family, it.video))
        ray.get(writer.add_responses.remote(responses))  # durable before it is judged
        queue.put_batch(items)  # blocks while the queue is full: the backpressure on generators
        self.metrics["responses"].inc(len(responses), tags={"model": self.member.name})
        return {"batch": batch.index, "member": batch.member, "responses": len(responses),
                "seconds": time.perf_counter() - t0}
