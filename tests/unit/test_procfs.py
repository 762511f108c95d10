"""Finding processes by an environment entry or a working directory (Linux /proc)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from prefect_gpu_workers.procfs import pids_in_directory, pids_with_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_process_is_found_by_its_environment_and_its_directory(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    child = subprocess.Popen(["sleep", "30"], env={"PGW_TEST_MARK": marker}, cwd=tmp_path)
    try:
        assert pids_with_env("PGW_TEST_MARK", marker) == [child.pid]
        assert pids_with_env("PGW_TEST_MARK", marker[:-1]) == []  # whole values only
        assert pids_in_directory(tmp_path) == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert pids_with_env("PGW_TEST_MARK", marker) == []
    assert pids_in_directory(tmp_path) == []
