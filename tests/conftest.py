"""Shared fixtures, and the test tiers by folder.

Tiers: ``tests/unit`` (pure: no server, nothing built), ``tests/integration``
(a real Prefect server), ``tests/cluster`` (the dev control plane and its
tools). Every test is marked with its tier, so ``-m unit`` selects like the
folder does. This file keeps Prefect out of its imports: the unit tier does
not pay for it unless a test needs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from broker_harness import HolderProcess
    from worker_harness import DrainingWorker

    from prefect_gpu_workers.server import LocalPrefectServer

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "cluster")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with the tier its folder names."""
    for item in items:
        parts = item.path.relative_to(TESTS).parts if TESTS in item.path.parents else ()
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPrefectServer]:
    """A real ``prefect server start`` on the embedded PostgreSQL, shared by the session's tests.

    PostgreSQL, as production servers run: on SQLite, a dozen flow runs at once
    on two busy cores locked the database for minutes ("database is locked").

    Tests point both this process (temporary settings) and any subprocess
    (``prefect_server.env()``) at it.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_gpu_workers.server import LocalPrefectServer

    server = LocalPrefectServer(home=tmp_path_factory.mktemp("prefect-home"), database="postgres")
    # A first start migrates a fresh database: minutes on a loaded 2-core machine.
    server.start(timeout_s=300)
    try:
        os.environ.update(server.env())
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server
    finally:
        server.stop()


@pytest.fixture
def repo_root() -> Path:
    return TESTS.parent


@pytest.fixture
def start_worker(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> Iterator[Callable[..., DrainingWorker]]:
    """Start worker entrypoints (``python -m prefect_gpu_workers worker``) in child
    processes, each with its own pool, limit and deployment; all stopped after the test."""
    from broker_harness import unique_worker, wait_until
    from prefect.client.orchestration import get_client
    from worker_harness import DrainingWorker

    from prefect_gpu_workers.local.prefect_ops import (
        deploy_for_local_workers,
        ensure_gpu_limit,
        ensure_process_pool,
    )
    from prefect_gpu_workers.naming import WORKER_ID_ENV
    from prefect_gpu_workers.server import stop_process_group

    started: list[DrainingWorker] = []

    def start(
        drain_s: float,
        flow_runs: int = 2,
        like: DrainingWorker | None = None,
        api_url: str | None = None,
    ) -> DrainingWorker:
        """A new worker, or (``like``) the next worker of that one's name, pool and limit;
        ``api_url``: the Prefect API it talks to (a proxy in front of the server)."""
        worker = like.worker if like else unique_worker()
        pool, limit = f"drain-{worker}", f"gpu:{worker}"
        if like is None:
            with get_client(sync_client=True) as client:
                ensure_process_pool(client, pool)
                ensure_gpu_limit(client, limit, 2)
            deployment_id = deploy_for_local_workers(pool, f"pipeline-{worker}")
        else:
            deployment_id = like.deployment_id
        log_path = tmp_path / f"{worker}-{len(started)}.log"
        # A short path: a Unix socket's is at most 107 bytes, tmp_path's may be longer.
        metrics_socket = Path(tempfile.mkdtemp(prefix="pgw-")) / "metrics.sock"
        env = {
            **os.environ,
            **prefect_server.env(),
            WORKER_ID_ENV: worker,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        }
        if api_url is not None:
            env["PREFECT_API_URL"] = api_url
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect_gpu_workers", "worker", "--pool", pool,
                 "--flow-runs", str(flow_runs), "--drain-seconds", str(drain_s),
                 "--metrics-socket", str(metrics_socket)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        handle = DrainingWorker(worker, limit, deployment_id, proc, log_path, metrics_socket)
        started.append(handle)
        wait_until(lambda: "slot broker for" in handle.log(), "the worker is up", 180)
        return handle

    yield start
    for handle in started:
        stop_process_group(handle.proc, grace_s=30)
        shutil.rmtree(handle.metrics_socket.parent, ignore_errors=True)


@pytest.fixture
def holders() -> Iterator[list[HolderProcess]]:
    """Holder processes (``slot_holder.py``) a test starts; every one is gone after it."""
    started: list[HolderProcess] = []
    yield started
    for holder in started:
        holder.stop()
