"""A trained reward model as a judge (`judge.kind: reward_model`): VLM-RLAIF's context-aware RM.

One forward pass per answer, batched across the questions of a judge batch; no text to parse,
so it cannot fail to parse.  Each judgment keeps the raw reward (`scores["reward"]`) and gives an
overall score on the teacher's rubric scale through the calibration fitted when the RM was
trained (`reward_model.json`: teacher score ~ a * reward + b, clipped to the teacher's range),
so pair margins mean what they meant for the teacher.  The judgment's `raw` holds the RM's
provenance: its id, what it was trained on, and the teacher it learned from.

An answer the RM cannot score is an explicit failure record: a question without the caption the
RM was trained to read, a video RM without the video, a reward that is not finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vpref.data.schema import Judgment, Verdict, judgment_id
from vpref.judges.base import ResponseView, SampleView
from vpref.models.reward import RMItem, calibrate, read_meta, rm_digest

RUBRIC = "reward_model"


def identity(cfg_or_path) -> tuple[str, str, str]:
    """(judge name, rubric, rubric version) of a reward model folder (or a JudgeConfig naming one),
    without loading it."""
    path = Path(getattr(cfg_or_path, "model", cfg_or_path))
    meta = read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is not a reward model folder (no reward_model.json); train one with "
                                "`vpref train-rm`")
    digest = rm_digest(path)
    backbone = Path(meta.get("backbone_init") or path).name
    return f"rm:{backbone}@{digest[:8]}", RUBRIC, f"rm@{digest}/{meta.get('prompt_version', '?')}"


class RewardModelJudge:
    rubric = RUBRIC

    def __init__(self, scorer, path: str | Path, batch_size: int = 16, actor: str = ""):
        """`scorer`: a `RewardModel` (HF) or `VLLMRewardModel` -- `rewards(items, clips) -> floats`."""
        self.scorer, self.path, self.batch_size, self.actor = scorer, str(path), batch_size, actor
        self.name, _, self.rubric_version = identity(path)
        self.meta = read_meta(path) or {}
        self.calibration = self.meta.get("calibration")
        self.video = bool(getattr(scorer, "video", False))
        self.clips = None
        if self.video:
            from vpref.models.reward import Clips

            self.clips = Clips(self.meta.get("num_frames", 8), self.meta.get("frame_size"))
        self.provenance = json.dumps({"rm": self.path, "id": self.rubric_version, "teacher": self.meta.get("teacher"),
                                      "trained_on": self.meta.get("trained_on"),
                                      "calibration": (self.calibration or {}).get("kind", "none")}, default=str)

    # ------------------------------------------------------------------ batched scoring

    def _problem(self, item: RMItem) -> str | None:
        if item.caption is None:
            return "the reward model reads the video's caption, and this question has none"
        if self.video and not item.video:
            return "a video reward model needs the video, and this item names none"
        return None

    def rewards(self, items: list[RMItem]) -> list[float | str]:
        """A reward per item, or the reason it has none."""
        out: list = [self._problem(it) for it in items]
        todo = [i for i, p in enumerate(out) if p is None]
        ok_items = [items[i] for i in todo]
        clips, bad = [], {}
        if self.video:
            for i, it in zip(todo, ok_items):
                try:
                    clips.append(self.clips(it.video))
                except Exception as e:  # VideoDecodeError: that answer cannot be scored
                    bad[i] = f"video {it.video} could not be decoded: {e}"
            if bad:
                ok_items = [it for i, it in zip(todo, ok_items) if i not in bad]
                todo = [i for i in todo if i not in bad]
        rewards = self.scorer.rewards(ok_items, clips if self.video else None, self.batch_size) if ok_items else []
        for i, r in zip(todo, rewards):
            out[i] = r if math.isfinite(r) else f"the reward is not finite ({r})"
        for i, why in bad.items():
            out[i] = why
        return out

    def _judgment(self, rid: str, sid: str, reward) -> Judgment:
        base = dict(judgment_id=judgment_id(rid, self.name), response_id=rid, sample_id=sid, judge=self.name,
                    rubric=self.rubric, rubric_version=self.rubric_version, judge_actor=self.actor, path="reward")
        if isinstance(reward, str):
            return Judgment(ok=False, error=reward, raw=self.provenance, failure="unscorable", **base)
        overall = calibrate(reward, self.calibration)
        return Judgment(ok=True, scores={"reward": round(reward, 6)}, overall=round(overall, 4),
                        rationale=f"reward {reward:+.3f} -> {overall:.2f} on the teacher's scale",
                        raw=self.provenance, **base)

    def judge_items(self, items: list[dict]) -> tuple[list[Judgment], list[Verdict]]:
        """A whole judge batch in one pass (the judge actor calls this instead of `score` per
        question): response items scored together, pair items compared."""
        resp = [i for i in items if i["kind"] == "response"]
        pairs = [i for i in items if i["kind"] == "pair"]
        rows = [_item(i, i["text"]) for i in resp]
        for p in pairs:
            rows += [_item(p, p["first_text"]), _item(p, p["second_text"])]
        rewards = self.rewards(rows)
        judgments = [self._judgment(i["response_id"], i["sample_id"], r) for i, r in zip(resp, rewards)]
        verdicts = []
        for k, p in enumerate(pairs):
            a, b = rewards[len(resp) + 2 * k], rewards[len(resp) + 2 * k + 1]
            v = self._verdict(p["sample_id"], p["first_id"], p["second_id"], a, b)
            v.verdict_id = p["verdict_id"]
            verdicts.append(v)
        return judgments, verdicts

    # ------------------------------------------------------------------ the Judge interface

    def score(self, sample: SampleView, responses: list[ResponseView]) -> list[Judgment]:
        rows = [RMItem(sample.question, r.text, sample.caption, sample.answer) for r in responses]
        return [self._judgment(r.response_id, sample.sample_id, x) for r, x in zip(responses, self.rewards(rows))]

    def compare(self, sample: SampleView, first: ResponseView, second: ResponseView) -> Verdict:
        a, b = self.rewards([RMItem(sample.question, first.text, sample.caption, sample.answer),
                             RMItem(sample.question, second.text, sample.caption, sample.answer)])
        return self._verdict(sample.sample_id, first.response_id, second.response_id, a, b)

    def _verdict(self, sid: str, first_id: str, second_id: str, a, b) -> Verdict:
        """The higher reward wins in each order (a reward model has no position to be biased by);
        a tie goes to position A, so it comes out inconsistent and is dropped."""
        if isinstance(a, str) or isinstance(b, str):
            return Verdict("", sid, first_id, second_id, None, None, ok=False, consistent=False,
                           error=a if isinstance(a, str) else b, judge=self.name, judge_actor=self.actor)
        ab = "B" if b > a else "A"
        ba = "B" if a > b else "A"
        return Verdict("", sid, first_id, second_id, ab, ba, ok=True, consistent=(ab == "A") != (ba == "A"),
                       raw=f"rewards {a:+.4f} / {b:+.4f}", judge=self.name, judge_actor=self.actor)


def _item(it: dict, text: str) -> RMItem:
    return RMItem(it["question"], text, it.get("caption"), it.get("answer"), it.get("video"))


def load_reward_judge(cfg, actor: str = "") -> RewardModelJudge:
    """The judge a `judge.kind: reward_model` config asks for, on its backend."""
    if cfg.backend == "vllm":
        from vpref.models.reward import VLLMRewardModel

        scorer = VLLMRewardModel(cfg.model, cfg.dtype, cfg.vllm)
    else:
        import torch

        from vpref.models.reward import RewardModel

        device = "cuda" if cfg.pool.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        scorer = RewardModel.load(cfg.model, cfg.dtype, device)
    return RewardModelJudge(scorer, cfg.model, cfg.rm_batch_size, actor=actor)


def build(cfg, actor: str = "") -> RewardModelJudge:  # the judge registry's entry point
    return load_reward_judge(cfg, actor)
