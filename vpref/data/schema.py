"""The records the data engine writes, and their Parquet schemas (one home for both).

Three tables, each a folder of Parquet shards under a build's output folder:

* ``responses/``  every answer a zoo member generated (one row per response id)
* ``judgments/``  every judge verdict on a response, including failures (``ok = false``)
* ``pairs/``      chosen/rejected pairs: TRL's ``prompt``/``chosen``/``rejected`` plus the video
                  and full provenance (models, sampling, judge, rubric and version, scores,
                  rationales, round, policy version)

Ids are deterministic, so a re-run or a retried task rewrites the same ids and readers keep one
row per id (exactly once).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 3  # 2: keyed lists instead of maps (loadable by HF datasets), float scores; 3: judge
# distributions (JSON strings), label mass, path, failure kind, usage and cost


def response_id(round_: int, sample_id: str, model: str, index: int) -> str:
    return f"r{round_}:{sample_id}:{model}:{index}"


def judgment_id(resp_id: str, judge: str) -> str:
    return f"{resp_id}@{judge}"


def pair_id(chosen_id: str, rejected_id: str) -> str:
    return hashlib.sha1(f"{chosen_id}>{rejected_id}".encode()).hexdigest()[:16]


@dataclass
class Response:
    response_id: str
    sample_id: str
    round: int
    model: str  # zoo member name
    model_path: str
    is_policy: bool
    policy_version: int  # version of this member's weights (bumped by every reload)
    index: int  # which of the member's samples for this question
    text: str
    num_tokens: int
    finish_reason: str  # stop | length | error
    temperature: float
    top_p: float
    seed: int
    error: str | None = None  # generation failed for this item (never silently empty)
    generator: str = ""  # actor name, e.g. gen-policy-0


@dataclass
class Judgment:
    """A judge's verdict on one response.  A failure is a Judgment with ok=False, the error and
    the judge's raw text -- never a silent 0 or None score."""

    judgment_id: str
    response_id: str
    sample_id: str
    judge: str  # judge identity, e.g. "reference" or the LLM judge's model
    rubric: str
    rubric_version: str
    ok: bool
    scores: dict[str, float] = field(default_factory=dict)
    overall: float | None = None
    rationale: str = ""
    error: str | None = None
    raw: str | None = None
    attempts: int = 1
    judge_actor: str = ""
    # Distributional judges: per aspect the label distribution (renormalised; `scores` holds its
    # expected value) and the label mass before renormalising.
    distributions: dict[str, dict[str, float]] = field(default_factory=dict)
    label_mass: dict[str, float] = field(default_factory=dict)
    path: str = ""  # what produced it: logprobs | text | likelihood | reference (several: comma-joined)
    failure: str = ""  # why it failed, one word: low_mass | unparsed | endpoint | circuit_open | no_context
    requests: int = 0  # endpoint requests sent for it (cache hits excluded)
    cache_hit: bool = False  # answered from the judgment cache, at no cost
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


@dataclass
class Verdict:
    """A pairwise comparison of two responses run in both orders."""

    verdict_id: str  # the candidate pair's id
    sample_id: str
    first_id: str
    second_id: str
    winner_ab: str | None  # "A"/"B" with first as A, None if unparseable
    winner_ba: str | None  # with second as A
    ok: bool  # both orders parsed
    consistent: bool  # both orders prefer the same response
    error: str | None = None
    raw: str | None = None
    judge: str = ""
    judge_actor: str = ""
    # Distributional verdicts: the verdict labels' probabilities in each order, and their symmetrised
    # P(first is better) = (p_ab[A] + p_ba[B]) / 2.  `consistent`: both orders prefer the same answer.
    probs_ab: dict[str, float] = field(default_factory=dict)  # first shown as A
    probs_ba: dict[str, float] = field(default_factory=dict)  # second shown as A
    p_first: float | None = None
    label_mass_ab: float | None = None
    label_mass_ba: float | None = None
    path: str = ""
    failure: str = ""
    requests: int = 0
    cache_hit: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def preferred(self) -> str | None:
        if not (self.ok and self.consistent):
            return None
        return self.first_id if self.winner_ab == "A" else self.second_id


@dataclass
class Pair:
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    video: str
    sample_id: str
    family: str | None
    round: int
    policy_version: int
    chosen_response_id: str
    rejected_response_id: str
    chosen_model: str
    rejected_model: str
    chosen_score: float
    rejected_score: float
    margin: float
    chosen_scores: dict[str, float]
    rejected_scores: dict[str, float]
    chosen_rationale: str
    rejected_rationale: str
    chosen_sampling: dict[str, float]
    rejected_sampling: dict[str, float]
    chosen_num_tokens: int
    rejected_num_tokens: int
    judge: str
    rubric: str
    rubric_version: str
    strategy: str
    pairwise: str  # "off" | "consistent"
    # the judge's label distributions per aspect and their label mass (distributional judges)
    chosen_distributions: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected_distributions: dict[str, dict[str, float]] = field(default_factory=dict)
    chosen_label_mass: dict[str, float] = field(default_factory=dict)
    rejected_label_mass: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- Arrow

# Named numbers (per-aspect scores, sampling settings) are lists of {key, value} structs rather
# than Arrow maps: Hugging Face `datasets` cannot load map columns, and a struct with fixed fields
# would fix the aspect names of one rubric.  Records hold them as plain dicts.
def keyed(value_type: pa.DataType) -> pa.DataType:
    return pa.list_(pa.struct([("key", pa.string()), ("value", value_type)]))


_SCORES = keyed(pa.float64())
_SAMPLING = keyed(pa.float64())
# Nested values (label distributions per aspect) are JSON strings: any rubric, any labels.
JSON_FIELDS = {"distributions", "chosen_distributions", "rejected_distributions"}
_USAGE = [("requests", pa.int32()), ("cache_hit", pa.bool_()), ("input_tokens", pa.int64()),
          ("output_tokens", pa.int64()), ("cost_usd", pa.float64())]

SCHEMAS: dict[str, pa.Schema] = {
    "responses": pa.schema([
        ("response_id", pa.string()), ("sample_id", pa.string()), ("round", pa.int32()), ("model", pa.string()),
        ("model_path", pa.string()), ("is_policy", pa.bool_()), ("policy_version", pa.int32()),
        ("index", pa.int32()), ("text", pa.string()), ("num_tokens", pa.int32()), ("finish_reason", pa.string()),
        ("temperature", pa.float64()), ("top_p", pa.float64()), ("seed", pa.int64()), ("error", pa.string()),
        ("generator", pa.string()),
    ]),
    "judgments": pa.schema([
        ("judgment_id", pa.string()), ("response_id", pa.string()), ("sample_id", pa.string()),
        ("judge", pa.string()), ("rubric", pa.string()), ("rubric_version", pa.string()), ("ok", pa.bool_()),
        ("scores", _SCORES), ("overall", pa.float64()), ("rationale", pa.string()), ("error", pa.string()),
        ("raw", pa.string()), ("attempts", pa.int32()), ("judge_actor", pa.string()),
        ("distributions", pa.string()), ("label_mass", _SCORES), ("path", pa.string()), ("failure", pa.string()),
        *_USAGE,
    ]),
    "verdicts": pa.schema([
        ("verdict_id", pa.string()), ("sample_id", pa.string()), ("first_id", pa.string()),
        ("second_id", pa.string()), ("winner_ab", pa.string()), ("winner_ba", pa.string()), ("ok", pa.bool_()),
        ("consistent", pa.bool_()), ("error", pa.string()), ("raw", pa.string()), ("judge", pa.string()),
        ("judge_actor", pa.string()), ("probs_ab", _SCORES), ("probs_ba", _SCORES), ("p_first", pa.float64()),
        ("label_mass_ab", pa.float64()), ("label_mass_ba", pa.float64()), ("path", pa.string()),
        ("failure", pa.string()), *_USAGE,
    ]),
    "pairs": pa.schema([
        ("pair_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
        ("video", pa.string()), ("sample_id", pa.string()), ("family", pa.string()), ("round", pa.int32()),
        ("policy_version", pa.int32()), ("chosen_response_id", pa.string()),
        ("rejected_response_id", pa.string()), ("chosen_model", pa.string()), ("rejected_model", pa.string()),
        ("chosen_score", pa.float64()), ("rejected_score", pa.float64()), ("margin", pa.float64()),
        ("chosen_scores", _SCORES), ("rejected_scores", _SCORES), ("chosen_rationale", pa.string()),
        ("rejected_rationale", pa.string()), ("chosen_sampling", _SAMPLING), ("rejected_sampling", _SAMPLING),
        ("chosen_num_tokens", pa.int32()), ("rejected_num_tokens", pa.int32()), ("judge", pa.string()),
        ("rubric", pa.string()), ("rubric_version", pa.string()), ("strategy", pa.string()),
        ("pairwise", pa.string()), ("chosen_distributions", pa.string()), ("rejected_distributions", pa.string()),
        ("chosen_label_mass", _SCORES), ("rejected_label_mass", _SCORES),
    ]),
}
KEYS = {"responses": "response_id", "judgments": "judgment_id", "verdicts": "verdict_id", "pairs": "pair_id"}
RECORDS = {"responses": Response, "judgments": Judgment, "verdicts": Verdict, "pairs": Pair}


def _row(record) -> dict:
    # Fields are flat (scalars and str->scalar dicts, or JSON), so no deep copy (asdict) is needed.
    row = {f.name: getattr(record, f.name) for f in fields(record)}
    for k, v in row.items():
        if k in JSON_FIELDS:
            row[k] = json.dumps(v, sort_keys=True)
        elif isinstance(v, dict):
            row[k] = [{"key": key, "value": value} for key, value in v.items()]
    return row


def _unkey(k, v):
    if k in JSON_FIELDS:
        return json.loads(v) if v else {}
    return {e["key"]: e["value"] for e in v} if isinstance(v, list) else v


def from_row(table: str, row: dict):
    cls = RECORDS[table]
    # a column added after a shard was written reads as null there: take the field's default
    defaulted = {f.name for f in fields(cls)
                 if f.default not in (MISSING, None) or f.default_factory is not MISSING}
    return cls(**{k: _unkey(k, v) for k, v in row.items()
                  if k in _field_names(cls) and not (v is None and k in defaulted and k not in JSON_FIELDS)})


def _field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def write_shard(folder: str | Path, table: str, records: list) -> Path | None:
    """Write records as one new Parquet shard, atomically (temp file, then rename)."""
    if not records:
        return None
    folder = Path(folder) / table
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex[:12]}.parquet"
    tmp = folder / f".{name}.tmp"
    pq.write_table(pa.Table.from_pylist([_row(r) for r in records], schema=SCHEMAS[table]), tmp)
    os.replace(tmp, folder / name)
    return folder / name


def read_table(folder: str | Path, table: str) -> pa.Table:
    """All shards of a table, one row per id (the first written wins)."""
    path = Path(folder) / table
    files = sorted(p for p in path.glob("part-*.parquet")) if path.is_dir() else []
    if not files:
        return SCHEMAS[table].empty_table()
    t = pa.concat_tables([pq.read_table(f, schema=SCHEMAS[table]) for f in files])
    keys = t.column(KEYS[table]).to_pylist()
    seen, keep = set(), []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return t.take(keep) if len(keep) < len(keys) else t


def read_records(folder: str | Path, table: str) -> list:
    return [from_row(table, r) for r in read_table(folder, table).to_pylist()]


def compact(folder: str | Path, table: str) -> int:
    """Merge a table's shards into one file (readers dedupe by id, so a crash midway is harmless)."""
    path = Path(folder) / table
    files = sorted(path.glob("part-*.parquet")) if path.is_dir() else []
    if len(files) <= 1:
        return len(files)
    t = read_table(folder, table)
    tmp = path / ".part-compact.tmp"
    pq.write_table(t, tmp)
    final = path / f"part-{uuid.uuid4().hex[:12]}.parquet"
    os.replace(tmp, final)
    for f in files:
        f.unlink()
    return 1


def remove(folder: str | Path, table: str, keys: set[str]) -> int:
    """Rewrite a table without the rows whose key is in `keys` (as `compact` does: the new file
    first, then the old shards go; a crash in between leaves rows that readers dedupe)."""
    path = Path(folder) / table
    files = sorted(path.glob("part-*.parquet")) if path.is_dir() else []
    if not files or not keys:
        return 0
    t = read_table(folder, table)
    mask = pa.array([k not in keys for k in t.column(KEYS[table]).to_pylist()])
    kept = t.filter(mask)
    if kept.num_rows:
        tmp = path / ".part-remove.tmp"
        pq.write_table(kept, tmp)
        os.replace(tmp, path / f"part-{uuid.uuid4().hex[:12]}.parquet")
    for f in files:
        f.unlink()
    return t.num_rows - kept.num_rows


def schema_doc() -> str:
    """Markdown description of the tables (written into each dataset card)."""
    lines = []
    for name, schema in SCHEMAS.items():
        lines.append(f"- `{name}/` (key `{KEYS[name]}`): " + ", ".join(f"`{f.name}` {f.type}" for f in schema))
    return "\n".join(lines)


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
