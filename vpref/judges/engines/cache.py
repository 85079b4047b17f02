"""The persistent judgment cache of endpoint judges: a reply paid for once is never paid for again.

One small gzip'd JSON file per request, named by the SHA-256 of (judge model, rubric version,
request body) under a 256-way fan-out.  Writes are atomic renames and nothing is locked, so any
number of judge processes on any number of nodes can share one folder (on shared storage).  The
request body holds the rendered prompt, the prefill and every decoding setting, so a changed
template, rubric or setting is a different key.  Failed requests are never stored.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import uuid
from pathlib import Path


class JudgmentCache:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()

    @staticmethod
    def key(model: str, tag: str, body: dict) -> str:
        blob = json.dumps({"model": model, "tag": tag, "body": body}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json.gz"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(gzip.decompress(self._path(key).read_bytes()))
        except (OSError, EOFError, ValueError):  # absent, or a torn file from a crash: ask again
            return None

    def put(self, key: str, value: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(gzip.compress(json.dumps(value).encode(), compresslevel=5))
        os.replace(tmp, path)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.json.gz")) if self.folder.is_dir() else 0
