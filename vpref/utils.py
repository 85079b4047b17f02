"""Small helpers shared across vpref."""

from __future__ import annotations

import sys
import time

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """One progress line on stderr, with seconds since start (readable in CI logs and Ray job logs)."""
    print(f"[vpref {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """Silence library progress bars and advisory warnings (they drown vpref's own progress)."""
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
