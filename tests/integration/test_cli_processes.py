"""The CLI as a user runs it, in a child process: refusals before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "prefect_gpu_workers"]


def test_worker_entrypoint_needs_a_worker_id() -> None:
    env = {k: v for k, v in os.environ.items() if k != "WORKER_ID"}
    result = subprocess.run(
        [*CLI, "worker", "--pool", "nowhere", "--flow-runs", "2", "--wait-timeout", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "WORKER_ID is not set" in result.stderr


def test_no_limit_is_refused_without_a_gpu() -> None:
    from prefect_gpu_workers.gpu import detect_gpus

    if detect_gpus().count:
        pytest.skip("this machine has a GPU: --no-limit would run")
    result = subprocess.run(
        [*CLI, "demo", "--no-limit"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "demo --no-limit needs an NVIDIA GPU" in result.stdout
    assert "Prefect" not in result.stdout  # refused before starting anything
