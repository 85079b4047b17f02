"""Small helpers shared across vpref."""

from __future__ import annotations

import sys
import time

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """One progress line on stderr, with seconds since start (readable in CI logs and Ray job logs)."""
    print(f"[vpref {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)
