"""PairWriter: the one writer of a build's responses, judgments, verdicts and pairs.

Exactly once: every record has a deterministic id; the writer keeps the ids it has written and
drops repeats (a retried task, a re-enqueued response).  Durable before acknowledged: each call
writes its Parquet shard before it returns, so a call that Ray retries after a crash finds its
records on disk.  A restarted writer rebuilds its state from the shards.

A question is finished when every expected response is judged; its pairs are then formed by
the pair strategy (and, with the pairwise check, only after both-order verdicts on each
candidate) and written.  Pair formation is a pure function of what is on disk, so redoing it
after a crash gives the same pairs.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from vpref.actors.judge import pair_item, response_item
from vpref.config import PairsConfig
from vpref.data.schema import (KEYS, Judgment, Pair, Response, Verdict, compact, pair_id, read_records, read_table,
                               remove, write_shard)
from vpref.judges.pairs import Candidate, make_pairs


PLAN = "plan.json"
RETRIED = "retried"  # failure records a re-run tried again, and the pairs their retry superseded (kept, never deleted)


def write_plan(out_dir: str | Path, plan: dict) -> None:
    """The build's plan: {"samples": {id: {question, answer, caption, family, video}}, "expected":
    {id: [response ids]}, "round", "policy_version", "judge", "rubric", "rubric_version",
    "pairwise"}."""
    out = Path(out_dir)
    tmp = out / (PLAN + ".tmp")
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, out / PLAN)


class PairWriter:
    def __init__(self, out_dir: str | None = None, pairs_cfg: dict | None = None, pair_queue=None,
                 state_file: str | None = None):
        """One writer serves the builds of a data engine, one at a time (`open`), so no build waits
        for a writer process to start.  `state_file` records the open build: a restarted writer
        reopens it and rebuilds its state from the build's folder (its plan and shards)."""
        self.pair_queue = pair_queue
        self.state_file = Path(state_file) if state_file else None
        self.out = None
        from vpref.actors.metrics import writer_metrics

        self.metrics = writer_metrics()
        st = json.loads(self.state_file.read_text()) if self.state_file and self.state_file.is_file() else None
        if st and (Path(st["out_dir"]) / PLAN).is_file():  # a restart mid-build (a deleted build: nothing to reopen)
            self._load(st["out_dir"], st["pairs"])
        elif out_dir is not None:
            self.open(out_dir, pairs_cfg or {})

    def open(self, out_dir: str, pairs_cfg: dict) -> list[str]:
        """Serve the build in `out_dir` (its plan.json written first, see `write_plan`); returns
        the ids of the responses already on disk."""
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"out_dir": str(out_dir), "pairs": pairs_cfg}))
            os.replace(tmp, self.state_file)
        self._load(out_dir, pairs_cfg)
        return list(self.responses)

    def _load(self, out_dir: str, pairs_cfg: dict) -> None:
        self.out = Path(out_dir)
        self.plan = plan = json.loads((self.out / PLAN).read_text())
        self.samples: dict = plan["samples"]
        self.expected: dict[str, list[str]] = plan["expected"]
        self.cfg = PairsConfig.model_validate(pairs_cfg)
        self.judge = plan["judge"]
        self.responses: dict[str, Response] = {r.response_id: r for r in read_records(self.out, "responses")}
        self.judgments: dict[str, Judgment] = {
            j.response_id: j for j in read_records(self.out, "judgments") if j.judge == self.judge
        }
        self.verdicts: dict[str, Verdict] = {v.verdict_id: v for v in read_records(self.out, "verdicts")}
        self.pairs: dict[str, Pair] = {p.pair_id: p for p in read_records(self.out, "pairs")}
        self.finished: set[str] = set()
        self.dropped: dict[str, str] = {}
        self.requested: set[str] = set()
        self.counts = Counter()
        for sid in self.expected:  # a restart (or a resumed build) finishes what it can at once
            self._maybe_finish(sid)

    def __getattr__(self, name):  # only reached for build state before the first `open`
        raise AttributeError(f"the pair writer has no open build (no {name!r} yet): call open(out_dir, pairs_cfg) first")

    def __repr__(self):
        return "pair-writer"

    # ------------------------------------------------------------------ intake

    def add_responses(self, responses: list[Response]) -> int:
        # (a batch of an aborted earlier build may still arrive: only this build's own ids are kept)
        new = [r for r in responses if r.response_id not in self.responses and r.sample_id not in self.dropped
               and r.sample_id in self.expected]
        self.counts["duplicate_responses"] += len(responses) - len(new)
        write_shard(self.out, "responses", new)
        for r in new:
            self.responses[r.response_id] = r
        self._finish_samples({r.sample_id for r in new if r.error})
        return len(new)

    def add_judgments(self, judgments: list[Judgment]) -> int:
        new = [j for j in judgments if j.response_id not in self.judgments and j.response_id in self.responses]
        self.counts["duplicate_judgments"] += len(judgments) - len(new)
        write_shard(self.out, "judgments", new)
        for j in new:
            self.judgments[j.response_id] = j
        self._finish_samples({j.sample_id for j in new})
        return len(new)

    def add_verdicts(self, verdicts: list[Verdict]) -> int:
        new = [v for v in verdicts if v.verdict_id not in self.verdicts]
        write_shard(self.out, "verdicts", new)
        for v in new:
            self.verdicts[v.verdict_id] = v
        self._finish_samples({v.sample_id for v in new})
        return len(new)

    def retry_failures(self, max_attempts: int) -> dict:
        """Give failed items another try (a re-run of the build): failure records with tries left
        move to `retried/<table>/`, and the questions they belong to reopen -- their pairs move
        there too and are formed again once the new results are in.  Tries are counted across
        re-runs from that history; what succeeded is never touched."""
        hist = self.out / RETRIED
        tried = Counter()
        for table in ("responses", "judgments", "verdicts"):
            tried.update(read_table(hist, table).column(KEYS[table]).to_pylist())
        fails = {"responses": [r for r in self.responses.values() if r.error and r.sample_id not in self.dropped],
                 "judgments": [j for j in self.judgments.values() if not j.ok],
                 "verdicts": [v for v in self.verdicts.values() if not v.ok]}
        again = {t: [r for r in recs if tried[getattr(r, KEYS[t])] + 1 < max_attempts] for t, recs in fails.items()}
        reopened = {r.sample_id for recs in again.values() for r in recs}
        again["pairs"] = [p for p in self.pairs.values() if p.sample_id in reopened]
        for table, recs in again.items():
            if recs:
                write_shard(hist, table, recs)  # the history first: a crash in between only repeats a retry
                remove(self.out, table, {getattr(r, KEYS[table]) for r in recs})
        for r in again["responses"]:
            del self.responses[r.response_id]
        for j in again["judgments"]:
            del self.judgments[j.response_id]
        for v in again["verdicts"]:
            del self.verdicts[v.verdict_id]
        for p in again["pairs"]:
            del self.pairs[p.pair_id]
        self.finished -= reopened
        self.requested -= {v.verdict_id for v in again["verdicts"]}
        out = {t: len(again[t]) for t in ("responses", "judgments", "verdicts")}
        out["exhausted"] = sum(len(fails[t]) - len(again[t]) for t in fails)  # failed max_attempts times: kept as is
        out["response_ids"] = [r.response_id for r in again["responses"]]
        self.counts.update({f"retried_{t}": n for t, n in out.items() if t in fails})
        return out

    def drop_samples(self, reasons: dict[str, str]) -> None:
        """Questions that cannot be answered (their video did not decode): never wait for them."""
        self.dropped.update(reasons)

    # ------------------------------------------------------------------ finishing a question

    def _finish_samples(self, ids) -> None:
        written = []
        for sid in sorted(ids):
            written += self._maybe_finish(sid, write=False)
        self._write_pairs(written)

    def _write_pairs(self, pairs: list[Pair]) -> None:
        new = [p for p in pairs if p.pair_id not in self.pairs]
        write_shard(self.out, "pairs", new)
        for p in new:
            self.pairs[p.pair_id] = p
        if new:
            self.metrics["pairs"].inc(len(new))

    def _maybe_finish(self, sid: str, write: bool = True) -> list[Pair]:
        if sid in self.finished or sid in self.dropped:
            return []
        resps = [self.responses.get(rid) for rid in self.expected[sid]]
        if any(r is None for r in resps):
            return []
        if any(r.error is None and r.response_id not in self.judgments for r in resps):
            return []
        cands = [Candidate(r.response_id, r.text, self.judgments[r.response_id].overall, r.num_tokens)
                 for r in resps if r.error is None and self.judgments[r.response_id].ok]
        chosen_rejected = make_pairs(cands, self.cfg.strategy, self.cfg.min_margin, self.cfg.max_length_ratio)
        if self.plan.get("pairwise"):
            pending = [(c, r) for c, r in chosen_rejected if pair_id(c.response_id, r.response_id) not in self.verdicts]
            if pending:
                self._request_verdicts(sid, pending)
                return []
            resolved = []
            for c, r in chosen_rejected:
                v = self.verdicts[pair_id(c.response_id, r.response_id)]
                if v.preferred is None:
                    continue  # inconsistent across the two orders, or unparseable: dropped (counted in status)
                resolved.append((c, r) if v.preferred == c.response_id else (r, c))
            chosen_rejected = resolved
        pairs = [self._pair(sid, c, r) for c, r in chosen_rejected]
        self.finished.add(sid)
        if write:
            self._write_pairs(pairs)
        return pairs

    def _request_verdicts(self, sid: str, pending) -> None:
        s = self.samples[sid]
        for c, r in pending:
            vid = pair_id(c.response_id, r.response_id)
            if vid in self.requested or self.pair_queue is None:
                continue
            self.requested.add(vid)
            self.pair_queue.put_nowait(pair_item(vid, sid, (c.response_id, c.text), (r.response_id, r.text),
                                                 s["question"], s.get("answer"), s.get("caption"), s.get("family")))

    def _pair(self, sid: str, c: Candidate, r: Candidate) -> Pair:
        s = self.samples[sid]
        rc, rr = self.responses[c.response_id], self.responses[r.response_id]
        jc, jr = self.judgments[c.response_id], self.judgments[r.response_id]
        return Pair(
            pair_id=pair_id(c.response_id, r.response_id), prompt=s["question"], chosen=rc.text, rejected=rr.text,
            video=s["video"], sample_id=sid, family=s.get("family"), round=self.plan["round"],
            policy_version=self.plan["policy_version"], chosen_response_id=rc.response_id,
            rejected_response_id=rr.response_id, chosen_model=rc.model, rejected_model=rr.model,
            chosen_score=jc.overall, rejected_score=jr.overall, margin=round(jc.overall - jr.overall, 4),
            chosen_scores=jc.scores, rejected_scores=jr.scores, chosen_rationale=jc.rationale,
            rejected_rationale=jr.rationale,
            chosen_sampling={"temperature": rc.temperature, "top_p": rc.top_p, "seed": float(rc.seed)},
            rejected_sampling={"temperature": rr.temperature, "top_p": rr.top_p, "seed": float(rr.seed)},
            chosen_num_tokens=rc.num_tokens, rejected_num_tokens=rr.num_tokens, judge=jc.judge, rubric=jc.rubric,
            rubric_version=jc.rubric_version, strategy=self.cfg.strategy,
            pairwise="consistent" if self.plan.get("pairwise") else "off",
            chosen_distributions=jc.distributions, rejected_distributions=jr.distributions,
            chosen_label_mass=jc.label_mass, rejected_label_mass=jr.label_mass,
        )

    # ------------------------------------------------------------------ progress and recovery

    def status(self) -> dict:
        expected = {sid: rids for sid, rids in self.expected.items() if sid not in self.dropped}
        n_expected = sum(len(v) for v in expected.values())
        verdicts = list(self.verdicts.values())
        return {
            "expected_responses": n_expected,
            "responses": sum(1 for r in self.responses.values() if r.sample_id not in self.dropped),
            "generation_errors": sum(1 for r in self.responses.values() if r.error),
            "judged": len(self.judgments),
            "judge_failures": sum(1 for j in self.judgments.values() if not j.ok),
            "verdicts": len(verdicts),
            "verdicts_inconsistent": sum(1 for v in verdicts if v.ok and not v.consistent),
            "verdicts_failed": sum(1 for v in verdicts if not v.ok),
            "pairs": len(self.pairs),
            "samples": len(expected),
            "samples_finished": len(self.finished),
            "samples_dropped": len(self.dropped),
            "complete": len(self.finished) == len(expected),
            **self.counts,
        }

    def failure_summary(self, examples: int = 3) -> dict:
        """Per zoo member: expected, answered, failed, and a few distinct errors; the same for the
        judge.  What a failure-budget message shows."""
        members: dict[str, dict] = {}
        for sid, rids in self.expected.items():
            if sid in self.dropped:
                continue
            for rid in rids:
                m = members.setdefault(rid.rsplit(":", 2)[1], {"expected": 0, "ok": 0, "failed": 0, "errors": []})
                m["expected"] += 1
                r = self.responses.get(rid)
                if r is None:
                    continue
                if r.error:
                    m["failed"] += 1
                    if r.error not in m["errors"] and len(m["errors"]) < examples:
                        m["errors"].append(r.error)
                else:
                    m["ok"] += 1
        judge_errors = []
        for j in list(self.judgments.values()) + list(self.verdicts.values()):
            if not j.ok and j.error and j.error not in judge_errors and len(judge_errors) < examples:
                judge_errors.append(j.error)
        return {"members": members, "judge": self.judge, "judge_errors": judge_errors}

    def missing(self) -> list[dict]:
        """Recover work whose result never came back (a lost queue item, a judge that died with a
        batch): returns the response items to judge again, and puts pair jobs whose verdict is
        missing back on the pair queue."""
        todo = []
        for r in self.responses.values():
            if r.error is None and r.response_id not in self.judgments and r.sample_id not in self.dropped:
                s = self.samples[r.sample_id]
                todo.append(response_item(r.response_id, r.text, r.sample_id, s["question"], s.get("answer"),
                                          s.get("caption"), s.get("family"), s.get("video")))
        self.requested &= set(self.verdicts)  # forget requests that were lost, then ask again
        self._finish_samples(set(self.expected) - self.finished)
        return todo

    def finalize(self) -> dict:
        """Merge shards into one file per table; returns the final status."""
        for table in ("responses", "judgments", "verdicts", "pairs"):
            compact(self.out, table)
        return self.status()


def repair(src: str | Path, dst: str | Path, pairs_cfg: dict) -> dict:
    """Pair a finished build's saved judgments again with another strategy -- no generation, no
    judging.  The same pairing code path as a live build (a PairWriter run in this process).
    `dst` must be a new or empty folder: nothing of another build (or of `src`) is replaced."""
    from vpref.errors import FolderConflict, InputError
    from vpref.folders import BUILD_FILES, FolderLock

    src, dst = Path(src), Path(dst)
    if not (src / PLAN).is_file():
        raise InputError(f"{src} is not a vpref build folder (no {PLAN}): `vpref build-data` writes one in build.out, "
                         f"and each round of `vpref run` one in run.out_dir/round_<t>/data")
    s, d = src.resolve(), dst.resolve()
    if d == s or d.is_relative_to(s) or s.is_relative_to(d):
        raise FolderConflict(f"--out {dst} {'is' if d == s else 'overlaps'} the build it re-pairs ({src}); re-pairing "
                             f"writes responses/, judgments/ and pairs/ of its own, which would replace that build's: "
                             f"choose a new folder for --out")
    def refuse_taken() -> None:
        taken = [n for n in BUILD_FILES if (dst / n).exists()]
        if taken:
            raise FolderConflict(f"--out {dst} already holds {', '.join(taken)} (another build, or an earlier "
                                 f"`vpref pairs`); vpref replaces no data it did not write in this command: choose a "
                                 f"new or empty folder for --out")

    refuse_taken()  # before the lock too: a refused folder gets no lock file
    with FolderLock(dst, "pairs", "--out"):
        refuse_taken()
        return _repair_into(src, dst, pairs_cfg)


def _repair_into(src: Path, dst: Path, pairs_cfg: dict) -> dict:
    import shutil

    for table in ("responses", "judgments"):
        if (src / table).is_dir():
            shutil.copytree(src / table, dst / table)
    plan = json.loads((src / PLAN).read_text())
    plan["pairwise"] = False  # new candidates would need new verdicts, i.e. a judge
    write_plan(dst, plan)
    if (src / "build.json").is_file():
        build = json.loads((src / "build.json").read_text())
        from vpref.folders import digest

        build["pairs"] = PairsConfig.model_validate(pairs_cfg).model_dump()
        build.setdefault("inputs", {})["pairs"] = digest(build["pairs"])
        build["repaired_from"] = str(src)
        (dst / "build.json").write_text(json.dumps(build, indent=2))
    return PairWriter(str(dst), pairs_cfg).finalize()
