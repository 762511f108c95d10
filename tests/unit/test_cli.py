"""The CLI's checks that need no server: options, worker identity, what it imports."""

from __future__ import annotations

import os
import subprocess
import sys

CLI = [sys.executable, "-m", "prefect_gpu_workers"]


def test_bad_options_fail_before_starting_anything() -> None:
    result = subprocess.run(
        [*CLI, "demo", "--worker-prefix", "Not_Valid"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "not a DNS subdomain" in result.stderr


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


def test_cli_and_its_worker_parser_import_no_prefect() -> None:
    # `--help` and the entrypoint's argument parsing stay fast: local mode and
    # Prefect are imported only when a command runs.
    code = (
        "import sys; from prefect_gpu_workers.cli import build_parser; "
        "build_parser().parse_args(['worker', '--pool', 'p', '--flow-runs', '1']); "
        "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
