"""Finding processes by an environment entry or a working directory (Linux /proc)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from prefect_gpu_workers.procfs import descendants, pids_in_directory, pids_with_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _seen(find: Callable[[], list[int]], timeout_s: float = 30.0) -> list[int]:
    """What ``find`` finds once it finds anything: a process that has just been
    started shows an empty environment for an instant (procfs says callers look
    again). Before: one look right after the start, which a loaded CI machine
    caught in that instant."""
    deadline = time.monotonic() + timeout_s
    while not (found := find()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def test_a_process_is_found_by_its_environment_and_its_directory(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    child = subprocess.Popen(["sleep", "30"], env={"PGW_TEST_MARK": marker}, cwd=tmp_path)
    try:
        assert _seen(lambda: pids_with_env("PGW_TEST_MARK", marker)) == [child.pid]
        assert pids_with_env("PGW_TEST_MARK", marker[:-1]) == []  # whole values only
        assert _seen(lambda: pids_in_directory(tmp_path)) == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert pids_with_env("PGW_TEST_MARK", marker) == []
    assert pids_in_directory(tmp_path) == []


def test_descendants_are_found_through_their_parent_even_without_the_entry() -> None:
    """A marked process's children are its, whatever their environment says: the
    parent's entry finds them (``descendants``) when their own look misses."""
    marker = uuid.uuid4().hex
    env = {"PGW_TEST_MARK": marker, "PATH": "/usr/bin:/bin"}
    parent = subprocess.Popen(["bash", "-c", "env -i sleep 30 & wait"], env=env)

    def sleeping_child() -> list[int]:
        """The child once it runs ``sleep`` (before, it is bash's fork, with the entry)."""
        found = descendants(pids_with_env("PGW_TEST_MARK", marker))
        return [pid for pid in found if _cmdline(pid).startswith(b"sleep")]

    try:
        (child,) = _seen(sleeping_child)
        assert pids_with_env("PGW_TEST_MARK", marker) == [parent.pid]  # its own look misses it
        assert child not in pids_with_env("PGW_TEST_MARK", marker)
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)], check=False)
        parent.kill()
        parent.wait()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
