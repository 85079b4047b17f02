"""Manifests: JSONL or Parquet rows `{id, video, question, answer?, caption?, meta?}`.

Every row is validated; a bad row is set aside with its reason (a rejects file) and the rest go
on.  Video paths are resolved relative to the manifest and must stay inside the data root.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

REQUIRED = ("id", "video", "question")
OPTIONAL = ("answer", "caption", "meta")


@dataclass(frozen=True)
class Sample:
    """One (video, question) item.  `video` is an absolute path."""

    id: str
    video: str
    question: str
    answer: str | None = None
    caption: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def family(self) -> str | None:
        return self.meta.get("family")

    def to_row(self, root: Path | None = None) -> dict:
        row = asdict(self)
        if root is not None:
            row["video"] = str(Path(self.video).resolve().relative_to(root))
        return row


@dataclass(frozen=True)
class Reject:
    """A row that was set aside: where it was, what it was, why."""

    source: str
    row: int
    id: str | None
    reason: str
    raw: Any = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)


@dataclass
class Manifest:
    path: Path
    samples: list[Sample]
    rejects: list[Reject]

    def counts(self) -> dict:
        return {"rows": len(self.samples) + len(self.rejects), "ok": len(self.samples), "rejected": len(self.rejects)}

    def summary(self) -> str:
        c = self.counts()
        return f"{self.path}: {c['rows']} rows, {c['ok']} ok, {c['rejected']} rejected"


def append_rejects(path: str | Path, rejects: Iterable[Reject]) -> int:
    """Append rejects to a JSONL file, each once (a re-run finds the same rows bad again and does
    not repeat them); returns how many are in the file now from this call."""
    rejects = list(rejects)
    if rejects:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        seen = set(path.read_text(errors="replace").splitlines()) if path.is_file() else set()
        with open(path, "a") as f:
            for r in rejects:
                line = r.to_json()
                if line not in seen:
                    seen.add(line)
                    f.write(line + "\n")
    return len(rejects)


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    """(row number, raw row) pairs; a JSONL line that does not parse becomes a str raw row."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    rows = []
    with open(path, "rb") as f:  # bytes: one line that is not UTF-8 rejects that line, not the file
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append((n, f"line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                f"re-save the manifest as UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((n, f"invalid JSON ({e.msg} at column {e.colno}): {line.strip()[:200]}"))
    return rows


def _validate(raw: Any, manifest_dir: Path, root: Path) -> tuple[Sample | None, str | None]:
    if isinstance(raw, str):
        return None, raw
    if not isinstance(raw, dict):
        return None, f"row is a {type(raw).__name__}, expected an object"
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        return None, f"unknown field(s) {unknown}; allowed: {list(REQUIRED + OPTIONAL)}"
    for key in REQUIRED:
        v = raw.get(key)
        if not isinstance(v, str) or not v.strip():
            return None, f"field '{key}' must be a non-empty string, got {v!r}"
    for key in ("answer", "caption"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            return None, f"field '{key}' must be a string or null, got {type(raw[key]).__name__}"
    meta = raw.get("meta") or {}
    if isinstance(meta, str):  # Parquet manifests may carry meta as a JSON string
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return None, "field 'meta' is a string that is not valid JSON"
    if not isinstance(meta, dict):
        return None, f"field 'meta' must be an object, got {type(meta).__name__}"
    try:
        video = (manifest_dir / raw["video"]).resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13, OSError after)
        return None, f"video path {raw['video']!r} cannot be resolved: {'symlink loop' if 'loop' in str(e).lower() else e}"
    if not video.is_relative_to(root):
        return None, f"video path {raw['video']!r} escapes the data root {root}"
    if video.is_dir():
        return None, f"video path {raw['video']!r} is a directory, not a video file"
    if not video.is_file():
        return None, f"video file not found: {video}"
    return (
        Sample(
            id=raw["id"].strip(),
            video=str(video),
            question=raw["question"].strip(),
            answer=raw.get("answer"),
            caption=raw.get("caption"),
            meta=meta,
        ),
        None,
    )


def load_manifest(path: str | Path, data_root: str | Path | None = None) -> Manifest:
    """Load and validate a manifest.  `data_root` defaults to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path} (`vpref synth --out DIR` writes the synthetic world's "
                                f"train/dev/test manifests; for your own data point data.train/dev/test at yours)")
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"manifest {path} must be .jsonl or .parquet, got '{path.suffix}'")
    manifest_dir = path.parent.resolve()
    root = Path(data_root).resolve() if data_root else manifest_dir
    samples: list[Sample] = []
    rejects: list[Reject] = []
    first_seen: dict[str, int] = {}
    for n, raw in _read_rows(path):
        sample, reason = _validate(raw, manifest_dir, root)
        rid = raw.get("id") if isinstance(raw, dict) else None
        if sample is not None and sample.id in first_seen:
            sample, reason = None, f"duplicate id {sample.id!r} (first seen at row {first_seen[sample.id]})"
        if sample is None:
            rejects.append(Reject(str(path), n, rid if isinstance(rid, str) else None, reason, raw))
            continue
        first_seen[sample.id] = n
        samples.append(sample)
    return Manifest(path, samples, rejects)


def write_manifest(path: str | Path, samples: Iterable[Sample]) -> Path:
    """Write samples as JSONL (or Parquet by suffix) with video paths relative to the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent.resolve()
    rows = [s.to_row(root) for s in samples]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for r in rows:
            r["meta"] = json.dumps(r["meta"])
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return path


def family_counts(samples: Iterable[Sample]) -> dict[str, int]:
    return dict(sorted(Counter(s.family or "unknown" for s in samples).items()))


def decode_samples(samples: list[Sample], num_frames: int, size=None, timeout_s: float | None = 30.0):
    """Decode each distinct video once.  Returns (samples whose video decoded, {video: Clip},
    rejects for the samples whose video did not)."""
    from vpref.data.video import VideoDecodeError, decode_video

    clips, failed = {}, {}
    for s in samples:
        if s.video in clips or s.video in failed:
            continue
        try:
            clips[s.video] = decode_video(s.video, num_frames, size, timeout_s=timeout_s)
        except VideoDecodeError as e:
            failed[s.video] = e.cause
    ok = [s for s in samples if s.video in clips]
    rejects = [Reject("decode", 0, s.id, f"video {s.video}: {failed[s.video]}", s.to_row()) for s in samples
               if s.video in failed]
    return ok, clips, rejects
