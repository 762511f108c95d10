"""Find live processes by what ``/proc`` says of them: an environment entry, a working directory.

Linux only; where ``/proc`` is missing every lookup finds nothing, and callers
fall back to process groups. Stdlib only, so every layer may use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

PROC = Path("/proc")


def _live_pids() -> Iterator[Path]:
    """Each process's ``/proc`` entry except this process's own."""
    if not PROC.is_dir():
        return
    me = str(os.getpid())
    for entry in PROC.iterdir():
        if entry.name.isdigit() and entry.name != me:
            yield entry


def _pids_where(test: Callable[[Path], bool]) -> list[int]:
    found: list[int] = []
    for entry in _live_pids():
        try:
            if test(entry):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to look at
            continue
    return sorted(found)


def pids_with_env(name: str, value: str) -> list[int]:
    """Pids of live processes (not this one) whose environment has ``name=value``.

    A process that is just starting shows an empty environment for an instant
    (its parent's ``exec`` has returned, its new stack is not set up yet): it
    is found on the next look, so callers that must see every process look again.

    Args:
        name: the variable, e.g. ``PREFECT__FLOW_RUN_ID``.
        value: its exact value.

    Example:
        >>> pids_with_env("PGW_NO_SUCH_VARIABLE", "x")
        []
    """
    needle = f"{name}={value}".encode()
    return _pids_where(lambda entry: needle in (entry / "environ").read_bytes().split(b"\0"))


def pids_in_directory(directory: Path) -> list[int]:
    """Pids of live processes whose working directory is ``directory``.

    Every PostgreSQL server process runs in its data directory, so this finds a
    server whatever its process group or parent.
    """
    target = str(directory.resolve())
    return _pids_where(lambda entry: os.readlink(entry / "cwd") == target)
