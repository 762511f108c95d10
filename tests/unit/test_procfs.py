"""Finding processes by an environment entry or a working directory (Linux /proc)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from prefect_gpu_workers.procfs import pids_in_directory, pids_with_env

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
