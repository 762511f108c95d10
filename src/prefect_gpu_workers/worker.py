"""Worker entrypoint: wait until this worker's limit exists, then become the Prefect worker.

A worker that polled for flow runs before its limit existed would run GPU steps
that fail closed (or, with a plain ``concurrency()``, run unlimited). So the
container waits for ``{limit_prefix}:{WORKER_ID}`` to exist and be active, with a
timeout that fails visibly (non-zero exit, the reason on stderr), and only then
execs ``prefect worker start`` named after the worker (the command lines are
built in :mod:`prefect_gpu_workers.commands`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from prefect_gpu_workers.commands import prefect_worker_command
from prefect_gpu_workers.limits import (
    GpuLimitUnavailable,
    GpuSlotRequest,
    read_limit,
)
from prefect_gpu_workers.naming import worker_id_from_env


def wait_for_limit(
    request: GpuSlotRequest,
    timeout_s: float,
    poll_s: float = 2.0,
    report: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> None:
    """Block until ``request`` can be served by its limit; raise the last reason on timeout."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            request.check(read_limit(request.name))
            report(f"limit {request.name} is ready")
            return
        except GpuLimitUnavailable as exc:
            if str(exc) != str(last):
                report(f"waiting for limit: {exc}")
            last = exc
        except Exception as exc:  # Prefect not reachable yet: keep waiting, say so once
            if str(exc) != str(last):
                report(f"waiting for the Prefect API: {exc}")
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"limit {request.name} not ready after {timeout_s:.0f}s; last: {last}"
            )
        time.sleep(poll_s)


def run_worker(
    pool: str,
    flow_runs: int,
    limit_prefix: str,
    wait_timeout_s: float,
    with_healthcheck: bool = False,
) -> None:
    """Wait for the limit, then replace this process with the Prefect worker."""
    worker_id = worker_id_from_env()
    request = GpuSlotRequest.for_worker(1, limit_prefix, worker_id)
    wait_for_limit(request, wait_timeout_s)
    command = prefect_worker_command(sys.executable, pool, worker_id, flow_runs, with_healthcheck)
    os.execv(command[0], command)
