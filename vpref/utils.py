"""Small helpers shared across vpref, and vpref's terminal policy.

Two kinds of lines, both on stderr with seconds since start:

* `log(msg)`: a result or an event worth keeping (a stage finished, a warning, a file written).
* `progress(stage, msg)`: the current state of a running stage.  On a terminal it is the status
  line at the bottom, rewritten in place; when another stage's line replaces it, its last state
  stays on screen, so every stage leaves one line.  Elsewhere (Ray
  job logs, CI, pipes) it is printed at most every `PROGRESS_EVERY_S` seconds per stage, and the
  last state of a stage is always printed once a different line follows.

With `configure(log_dir=...)` every line, including throttled ones, is also appended to
`<log_dir>/vpref.log`; `vpref run`/`demo` put that (and Ray's logs, `vpref.cluster`) in the run
folder.  `configure(verbose=True)` (`--verbose`) lets Ray and Ray Train print to the terminal too.
Results meant for the terminal (tables) go through `say`: under `keep_internal_logs` a plain
`print` lands in the run folder's driver.log with the libraries' output.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path

_T0 = time.perf_counter()
PROGRESS_EVERY_S = 30.0


class _Term:
    def __init__(self):
        self.verbose = False
        self.log_dir: Path | None = None
        self.file = None
        # terminal: the status line at the bottom of the screen (stage, text, erase it when superseded?)
        self.live: tuple[str, str, bool] | None = None
        self.pending: tuple[str, str] | None = None  # elsewhere: (stage, line) not printed yet (throttled)
        self.last_print: dict[str, float] = {}
        self.out = None  # the terminal, when stderr itself goes to a log file (keep_internal_logs)
        self.stdout = None  # the terminal's stdout, likewise
        self.release = None  # undoes keep_internal_logs

    @property
    def stream(self):
        return self.out if self.out is not None else sys.stderr

    def tty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def to_file(self, line: str) -> None:
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    def draw(self, line: str) -> None:
        width = _width()
        self.stream.write("\r\x1b[K" + (line if len(line) <= width else line[: width - 1] + "…"))
        self.stream.flush()

    def commit(self) -> None:
        """Keep the status line on screen (a newline after it) / print the pending throttled line."""
        if self.live is not None:
            self.stream.write("\n")
            self.live = None
        if self.pending is not None:
            stage, line = self.pending
            self.pending = None
            self.stream.write(line + "\n")
            self.last_print[stage] = time.monotonic()
        self.stream.flush()


_term = _Term()


def _stamp(msg: str) -> str:
    return f"[vpref {time.perf_counter() - _T0:7.1f}s] {msg}"


def log(msg: str) -> None:
    """One permanent line on stderr, with seconds since start (readable in CI logs and Ray job logs).
    On a terminal it goes above a transient status line ("stage ..."), which stays at the bottom;
    any other status line is kept above it."""
    line = _stamp(msg)
    _term.to_file(line)
    if _term.tty() and _term.live is not None and _term.live[2]:
        _term.stream.write("\r\x1b[K" + line + "\n")
        _term.draw(_term.live[1])
        return
    _term.commit()
    print(line, file=_term.stream, flush=True)


def progress(stage: str, msg: str, transient: bool = False) -> None:
    """The current state of `stage` (e.g. "build", "sft policy"); see the module docstring.
    `transient`: on a terminal, erase this line (rather than keep it) when another stage's line
    replaces it, e.g. a "stage ..." line whose own final state follows later."""
    line = _stamp(msg)
    _term.to_file(line)
    if _term.tty():
        if _term.live is not None and _term.live[0] != stage and not _term.live[2]:
            _term.commit()  # the previous stage's last state stays on screen
        _term.draw(line)
        _term.live = (stage, line, transient)
        return
    if _term.pending is not None and _term.pending[0] != stage:
        _term.commit()
    now = time.monotonic()
    if now - _term.last_print.get(stage, -1e9) >= PROGRESS_EVERY_S:
        _term.pending = None
        print(line, file=_term.stream, flush=True)
        _term.last_print[stage] = now
    else:
        _term.pending = (stage, line)


def _width() -> int:
    try:
        return os.get_terminal_size(_term.stream.fileno()).columns
    except (OSError, AttributeError, ValueError):
        return 120


def _flush_at_exit() -> None:
    try:
        _term.commit()
    except (ValueError, OSError):  # the stream is already closed
        pass


atexit.register(_flush_at_exit)


def configure(verbose: bool | None = None, log_dir: str | Path | None = None) -> None:
    """The terminal policy of this process: `verbose` (Ray's own output too) and the folder of
    `vpref.log` (every line vpref printed, none throttled)."""
    if verbose is not None:
        _term.verbose = verbose
    if log_dir is not None:
        d = Path(log_dir)
        d.mkdir(parents=True, exist_ok=True)
        if _term.file is not None:
            _term.file.close()
        _term.log_dir = d
        _term.file = open(d / "vpref.log", "a")


def _console(stream, fd: int):
    """Where vpref's own lines go once fd `fd` points at the log file: a copy of the fd when
    `stream` writes to it, else `stream` itself (an in-process caller that replaced sys.stdout /
    sys.stderr, e.g. a test capturing them, keeps reading vpref's lines there)."""
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1)
    except (AttributeError, OSError, ValueError):
        pass
    return stream


def keep_internal_logs(log_dir: str | Path) -> Path:
    """Send everything but vpref's own output to `<log_dir>/driver.log`: whatever is written to
    file descriptors 1 and 2 (Ray's C++ core, gRPC, Ray's and Ray Train's console handlers,
    libraries that log to stdout such as DeepSpeed, plain `print`), Python warnings and logging.
    vpref's `log`/`progress` lines and `say` (tables) stay on the terminal; an uncaught exception
    is shown there too.  For command-line entry points; `release_internal_logs` undoes it (the
    command line calls it when the command ends, so an in-process caller gets its fds back)."""
    import logging
    import traceback

    release_internal_logs()
    d = Path(log_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "driver.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    terminal, _term.stdout = _console(sys.stderr, 2), _console(sys.stdout, 1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _term.out = terminal  # vpref's own lines keep going to the terminal
    logging.captureWarnings(True)
    handler = logging.StreamHandler(sys.stderr)  # = driver.log now (or the caller's stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    old_hook = sys.excepthook

    def excepthook(kind, value, tb):
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write(text)
        sys.stderr.flush()
        _term.commit()
        terminal.write(text)
        terminal.flush()

    sys.excepthook = excepthook

    def undo() -> None:
        _term.commit()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for k in saved:
            os.close(k)
        for mine, theirs in ((_term.out, sys.stderr), (_term.stdout, sys.stdout)):
            if mine is not None and mine is not theirs:
                mine.close()
        _term.out = _term.stdout = None
        root.removeHandler(handler)
        root.setLevel(old_level)
        logging.captureWarnings(False)
        sys.excepthook = old_hook

    _term.release = undo
    return path


def release_internal_logs() -> None:
    """Give fds 1 and 2 back to what they were before `keep_internal_logs` (a no-op otherwise)."""
    undo, _term.release = getattr(_term, "release", None), None
    if undo is not None:
        undo()


def terminal():
    """The stream vpref's own lines go to (the terminal, also under `keep_internal_logs`)."""
    return _term.stream


def say(*args, **kwargs) -> None:
    """`print` to the terminal's stdout (results, tables), also under `keep_internal_logs`, where
    a plain `print` goes to driver.log."""
    _term.commit()
    print(*args, file=_term.stdout if _term.stdout is not None else sys.stdout, flush=True, **kwargs)


def verbose() -> bool:
    return _term.verbose


def log_dir() -> Path | None:
    return _term.log_dir


def quiet_libraries() -> None:
    """Silence library progress bars and advisory warnings (they drown vpref's own progress)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
