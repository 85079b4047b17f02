"""Output folders with an owner: a lock per run/build folder, and digests of what made a folder's
contents (so a folder is never silently filled from two different sets of inputs).

The lock is `fcntl.flock` on `<folder>/.vpref.lock`: the kernel releases it when its process ends,
however it ends (kill -9 included), so a stale lock is simply free and the next command takes it
over; the file's text only says who holds it (pid, host, command, start time) for the message.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from vpref.errors import FolderConflict
from vpref.utils import log

LOCK = ".vpref.lock"
_held: dict[str, list] = {}  # resolved folder -> [fd, depth]: the same process may nest its own locks


class FolderLock:
    """`with FolderLock(folder, "run", key="run.out_dir"):` -- or acquire()/release().  A second
    process gets FolderConflict naming the holder; the same process may take it again (nested)."""

    def __init__(self, folder: str | Path, command: str, key: str | None = None):
        self.folder = Path(folder)
        self.command, self.key = command, key
        self._id = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        ident = str(self.folder.resolve())
        if ident in _held:
            _held[ident][1] += 1
            self._id = ident
            return self
        path = self.folder / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # a filesystem without locks (some network mounts)
                log(f"warning: {self.folder}: this filesystem cannot lock files ({e}); two commands on this folder "
                    f"would not notice each other")
                os.close(fd)
                self._id = None
                return self
            holder = _read_holder(fd)
            os.close(fd)
            where = f" ({self.key})" if self.key else ""
            who = (f"`vpref {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                   f"since {holder.get('started', '?')})") if holder else "another process"
            raise FolderConflict(f"{self.folder}{where} is in use by {who}: wait for it to finish, or use another "
                                 f"folder") from None
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            log(f"{self.folder}: taking over the lock of pid {previous.get('pid')} on {previous.get('host')} "
                f"(`vpref {previous.get('command')}`, since {previous.get('started')}): that process is gone")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        _held[ident] = [fd, 1]
        self._id = ident
        return self

    def release(self) -> None:
        if self._id is None or self._id not in _held:
            return
        entry = _held[self._id]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self._id]
            os.ftruncate(entry[0], 0)  # released, not abandoned: only a holder that died leaves its record
            fcntl.flock(entry[0], fcntl.LOCK_UN)  # the file stays: unlinking it would race a waiting process
            os.close(entry[0])
        self._id = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


# --------------------------------------------------------------------------- digests


def digest(obj) -> str:
    """A short, stable digest of any JSON-able value."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_digest(path: str | Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha1()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def checkpoint_identity(path: str | Path) -> str | None:
    """What a checkpoint folder is, cheaply: its SFT provenance when vpref trained it, else its
    config and the sizes of its weight files.  None when there is no checkpoint."""
    p = Path(path)
    prov = p / "vpref_sft.json"
    if prov.is_file():
        return "sft:" + digest(json.loads(prov.read_text()).get("inputs"))
    if not (p / "config.json").is_file():
        return None
    sizes = sorted((f.name, f.stat().st_size) for f in p.glob("*.safetensors"))
    return "files:" + digest([file_digest(p / "config.json"), sizes])


# --------------------------------------------------------------------------- what a build is made of


BUILD_FILES = ("responses", "judgments", "verdicts", "pairs", "retried", "plan.json", "plan.json.tmp", "build.json",
               "card.json", "card.png", "README.md", "rejects.jsonl", "captions.jsonl")
TABLES = ("responses", "judgments", "verdicts", "pairs")


def holds_build(folder: str | Path) -> bool:
    """True when the folder holds vpref build data (a plan or any table shard)."""
    f = Path(folder)
    return (f / "plan.json").is_file() or any(any((f / t).glob("part-*.parquet")) for t in TABLES if (f / t).is_dir())


def clear_build(folder: str | Path) -> list[str]:
    """Delete what a vpref build wrote in `folder` (and nothing else); returns the names removed."""
    import shutil

    f = Path(folder)
    removed = []
    for name in BUILD_FILES:
        p = f / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def check_build_inputs(folder: Path, parts: dict, hint: str) -> None:
    """Refuse to add to a build folder whose data came from other inputs.  `parts` maps a readable
    name ("questions", "zoo", "judge", ...) to the digest of that input; build.json keeps them."""
    build = folder / "build.json"
    if not holds_build(folder):
        return
    old = json.loads(build.read_text()).get("inputs") if build.is_file() else None
    if old is None:  # a build from before inputs were recorded: compare what the plan says
        plan = json.loads((folder / "plan.json").read_text()) if (folder / "plan.json").is_file() else {}
        old = {"questions": questions_digest((sid, v.get("video"), v.get("question"), v.get("answer"), v.get("family"))
                                             for sid, v in plan["samples"].items())} if plan.get("samples") else {}
    changed = [k for k in parts if k in old and old[k] != parts[k]]
    if changed or not old:
        raise FolderConflict(f"{folder} holds a build made from other inputs ({', '.join(changed) or 'unknown'} "
                             f"differ); adding to it would mix the two: {hint}")


def questions_digest(rows) -> str:
    """Digest of a build's questions as (id, video, question, answer, family) rows, in any order."""
    return digest(sorted([list(r) for r in rows], key=lambda r: str(r[0])))
