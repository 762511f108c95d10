"""Find live processes by what ``/proc`` says of them: an environment entry, a working directory.

Linux only; where ``/proc`` is missing every lookup finds nothing, and callers
fall back to process groups. Stdlib only, so every layer may use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator
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


def _parent_of(entry: Path) -> int:
    # The fields after the command name, which may itself hold spaces and ")".
    return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(pids: Collection[int]) -> set[int]:
    """Every live process (not this one) descended from one of ``pids``.

    Example:
        >>> descendants([]) == set()
        True
    """
    if not pids:
        return set()
    children: dict[int, list[int]] = {}
    for entry in _live_pids():
        try:
            children.setdefault(_parent_of(entry), []).append(int(entry.name))
        except (OSError, ValueError, IndexError):  # gone, or not ours to look at
            continue
    found: set[int] = set()
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def pids_with_env(name: str, value: str, **also: str) -> list[int]:
    """Pids of live processes (not this one) whose environment has ``name=value``
    (and each ``also`` entry as well).

    A process that is just starting shows an empty environment for an instant
    (its parent's ``exec`` has returned, its new stack is not set up yet): it
    is found on the next look, so callers that must see every process look again.
    Under load, a process whose environment has the entry has also gone unseen
    for seconds (about 1 look in 100 here, cause not found): callers whose
    processes inherit the entry add their :func:`descendants`, which finds it
    through its parent.

    Args:
        name: the variable, e.g. ``PREFECT__FLOW_RUN_ID``.
        value: its exact value.
        also: more variables the process must have, with these exact values
            (``WORKER_ID="w1"``: only the flow-run processes of worker w1).

    Example:
        >>> pids_with_env("PGW_NO_SUCH_VARIABLE", "x")
        []
    """
    needles = {f"{key}={wanted}".encode() for key, wanted in {name: value, **also}.items()}
    return _pids_where(lambda entry: needles <= set((entry / "environ").read_bytes().split(b"\0")))


def environment(pid: int) -> dict[str, str]:
    """Process ``pid``'s environment as it started (or as it published it); empty when
    the process is gone or not ours to read.

    Example:
        >>> "PGW_NO_SUCH_VARIABLE" in environment(os.getpid())
        False
    """
    try:
        entries = (PROC / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    found: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition(b"=")
        if sep and key.decode(errors="replace") not in found:
            found[key.decode(errors="replace")] = value.decode(errors="replace")
    return found


def env_value(pid: int, name: str) -> str | None:
    """The value of ``name`` in process ``pid``'s environment (as it started); ``None``
    when it has none, or the process is gone or not ours to read.

    Example:
        >>> env_value(os.getpid(), "PGW_NO_SUCH_VARIABLE") is None
        True
    """
    return environment(pid).get(name)


def is_running(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie has ended, only its parent has not reaped it yet.

    Example:
        >>> is_running(os.getpid())
        True
    """
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def pids_in_directory(directory: Path) -> list[int]:
    """Pids of live processes whose working directory is ``directory``.

    Every PostgreSQL server process runs in its data directory, so this finds a
    server whatever its process group or parent.
    """
    target = str(directory.resolve())
    return _pids_where(lambda entry: os.readlink(entry / "cwd") == target)


def thread_count() -> int:
    """Threads of this process as the kernel counts them (native threads too)."""
    try:
        return len(os.listdir(PROC / "self" / "task"))
    except OSError:  # no /proc: Python's own count is the best there is
        import threading

        return threading.active_count()


def owner_token(pid: int | None = None) -> str:
    """``<pid>:<start time>`` of a process: unlike a pid, never reused for another process.

    Raises:
        OSError: no such process (or ``/proc`` is missing).
    """
    pid = os.getpid() if pid is None else pid
    stat = (PROC / str(pid) / "stat").read_text()
    # Field 22 (start time); the command name before it may contain spaces.
    return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"


def owner_alive(token: str) -> bool:
    """Whether the process that ``token`` (:func:`owner_token`) names is still running."""
    pid, _, _start = token.partition(":")
    try:
        return pid.isdigit() and owner_token(int(pid)) == token
    except OSError:
        return False


# An environment entry that reserves room, in a process's environment block,
# for publish_environment (a fork that becomes another program writes there).
ENVIRON_ROOM_ENV = "PGW_ENVIRON_ROOM"
ENVIRON_ROOM_BYTES = 65536


def environ_room() -> dict[str, str]:
    """The entry to start a process with so its forks can :func:`publish_environment`."""
    return {ENVIRON_ROOM_ENV: "." * ENVIRON_ROOM_BYTES}


def publish_environment(environment: dict[str, str], first: Collection[str] = ()) -> int:
    """Make ``/proc/self/environ`` show ``environment``; the entries it could hold.

    ``/proc/<pid>/environ`` shows the block ``exec`` wrote, not ``os.environ``:
    a fork that becomes another program (a flow run forked from the warm
    launcher) would go on showing its parent's environment, and everything
    that finds a run's processes by their environment (the slot broker, the
    drain, local mode's stop) would miss it. This writes the entries over that
    block, ``first`` ones first, as many as fit, then zeroes the rest.

    Only after ``os.environ`` was replaced (so that nothing points into the old
    block any more); Linux only; 0 where the block cannot be found.
    """
    import ctypes

    try:
        fields = (PROC / "self" / "stat").read_text().rsplit(")", 1)[1].split()
        # Fields 50 and 51 (env_start, env_end), counted after the command name.
        start, end = int(fields[47]), int(fields[48])
    except (OSError, IndexError, ValueError):
        return 0
    if not 0 < start < end:
        return 0
    ordered = [key for key in first if key in environment]
    ordered += [key for key in environment if key not in ordered]
    block, written = b"", 0
    for key in ordered:
        entry = f"{key}={environment[key]}".encode() + b"\0"
        if len(block) + len(entry) > end - start:
            continue
        block += entry
        written += 1
    ctypes.memmove(start, block + b"\0" * (end - start - len(block)), end - start)
    return written
