"""The errors a vpref command stops with, and the exit code each one gives.

    0  the work is done
    1  a bug in vpref (a traceback; please report it)
    2  InputError: the config, a file or the cluster cannot do what was asked; nothing was started
    3  WorkFailed: too much of the work failed (the failure budget), or it stalled; what finished is kept
    4  FolderConflict: the output folder is in use, or holds results of other inputs

Every message names the input (a config key, a file, an actor) and what to do about it.
"""

from __future__ import annotations


class VprefError(Exception):
    exit_code = 1


class InputError(VprefError, ValueError):
    """Found before any work started: a bad config value, a missing file, resources the cluster lacks."""

    exit_code = 2


class WorkFailed(VprefError, RuntimeError):
    """The command did part of its work and stopped: the failure budget was exceeded, or work stalled.
    Everything finished is on disk; re-running retries what failed."""

    exit_code = 3


class FolderConflict(VprefError):
    """An output folder is locked by another process, or holds results made from other inputs."""

    exit_code = 4


def problems(header: str, lines: list[str], cls=InputError) -> VprefError:
    """One error listing several problems, one per line."""
    return cls(header + "\n  " + "\n  ".join(lines))
