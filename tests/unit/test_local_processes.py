"""Local mode's process bookkeeping: processes found and stopped by their marker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

from prefect_gpu_workers.local.plan import WorkerPlan
from prefect_gpu_workers.local.processes import (
    SESSION_MARKER_ENV,
    marked_pids,
    stop_marked,
    worker_command,
)


def test_marked_processes_are_found_and_stopped_even_in_their_own_session() -> None:
    marker = uuid.uuid4().hex
    env = {**os.environ, SESSION_MARKER_ENV: marker}
    # A grandchild in a new session, as a flow-run process would be.
    parent = subprocess.Popen(
        ["bash", "-c", "setsid sleep 300 & setsid sleep 300 & wait"],
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while len(marked_pids(marker)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(marked_pids(marker)) == 3
        stopped = stop_marked(marker, grace_s=5)
        assert parent.pid in stopped
        assert marked_pids(marker) == []
    finally:
        parent.kill()
        parent.wait(5)


def test_local_workers_run_the_pods_entrypoint_through_this_interpreter() -> None:
    command = worker_command(WorkerPlan("local-1", "infer", slots=2, flow_runs=5), "pool")
    assert command[:4] == [sys.executable, "-m", "prefect_gpu_workers", "worker"]
    assert command[4:8] == ["--pool", "pool", "--flow-runs", "5"]
    assert command[command.index("--limit-prefix") + 1] == "infer"
    # The worker id comes from WORKER_ID in its environment, as in a pod.
    assert "local-1" not in command
