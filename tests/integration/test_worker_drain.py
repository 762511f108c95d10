"""The worker entrypoint drains on SIGTERM (what the kubelet, ``start`` and Ctrl-C send):
it takes no new flow runs, lets those in flight finish within its drain, and stops the
rest in a state Prefect acts on, never Running, with their GPU slots given back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest
from broker_harness import active_slots, unique_worker, wait_until
from prefect.client.orchestration import SyncPrefectClient, get_client

from pgw_flows.params import PipelineParams
from prefect_gpu_workers.drain import SIGTERM_BEHAVIOR_ENV
from prefect_gpu_workers.local.prefect_ops import (
    deploy_for_local_workers,
    ensure_gpu_limit,
    ensure_process_pool,
    read_runs,
)
from prefect_gpu_workers.naming import WORKER_ID_ENV
from prefect_gpu_workers.procfs import pids_with_env
from prefect_gpu_workers.server import LocalPrefectServer, stop_process_group
from prefect_gpu_workers.worker import FLOW_RUN_ID_ENV


@dataclass
class DrainingWorker:
    """A worker entrypoint in a child process, its pool, limit and deployment."""

    worker: str
    limit: str
    deployment_id: UUID
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def submit(self, client: SyncPrefectClient, gpu_s: float, env: dict[str, str]) -> UUID:
        params = PipelineParams(items=1, download_s=0.5, gpu_s=gpu_s, save_s=0.5, simulate=True)
        run = client.create_flow_run_from_deployment(
            self.deployment_id, parameters=params.as_parameters(), job_variables={"env": env}
        )
        return run.id


def states(client: SyncPrefectClient, ids: list[UUID]) -> dict[UUID, tuple[str, str, str]]:
    """Each run's state type, name and message."""
    return {
        run.id: (run.state.type.value, run.state.name or "", run.state.message or "")
        for run in read_runs(client, ids)
        if run.state is not None
    }


@pytest.fixture
def start_worker(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> Iterator[Callable[..., DrainingWorker]]:
    started: list[DrainingWorker] = []

    def start(
        drain_s: float, flow_runs: int = 2, like: DrainingWorker | None = None
    ) -> DrainingWorker:
        """A new worker, or (``like``) the next worker of that one's name, pool and limit."""
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
        env = {
            **os.environ,
            **prefect_server.env(),
            WORKER_ID_ENV: worker,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        }
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect_gpu_workers", "worker", "--pool", pool,
                 "--flow-runs", str(flow_runs), "--drain-seconds", str(drain_s)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        handle = DrainingWorker(worker, limit, deployment_id, proc, log_path)
        started.append(handle)
        wait_until(lambda: "slot broker for" in handle.log(), "the worker is up", 180)
        return handle

    yield start
    for handle in started:
        stop_process_group(handle.proc, grace_s=30)


def test_sigterm_lets_the_runs_in_flight_finish_and_takes_no_more(
    start_worker: Callable[..., DrainingWorker],
) -> None:
    worker = start_worker(drain_s=300)
    with get_client(sync_client=True) as client:
        # Long enough that both are surely running at once, however slowly each starts.
        first = [worker.submit(client, gpu_s=20.0, env={}) for _ in range(2)]
        wait_until(
            lambda: (
                all(s[0] == "RUNNING" for s in states(client, first).values())
                and len(states(client, first)) == 2
            ),
            "both runs are running",
            300,
        )
        worker.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining" in worker.log(), "the worker starts draining", 30)
        late = worker.submit(client, gpu_s=1.0, env={})
        assert worker.proc.wait(timeout=300) == 0, worker.log()[-3000:]
        after = states(client, [*first, late])
    assert [after[run_id][0] for run_id in first] == ["COMPLETED", "COMPLETED"]
    assert after[late][0] == "SCHEDULED", "a draining worker took a new flow run"
    assert "drained in" in worker.log()
    assert "2 finished" in worker.log()
    assert active_slots(worker.limit) == 0


def test_runs_that_outlast_the_drain_are_rescheduled_or_crashed_with_their_slots_back(
    start_worker: Callable[..., DrainingWorker],
) -> None:
    worker = start_worker(drain_s=1)
    with get_client(sync_client=True) as client:
        rescheduled = worker.submit(client, gpu_s=120.0, env={SIGTERM_BEHAVIOR_ENV: "reschedule"})
        crashed = worker.submit(client, gpu_s=120.0, env={})
        # Both hold their GPU slot: the drain must stop them mid-step.
        wait_until(lambda: active_slots(worker.limit) == 2, "both GPU steps hold a slot", 300)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=60) == 0, worker.log()[-3000:]
        after = states(client, [rescheduled, crashed])
    assert after[rescheduled][:2] == ("SCHEDULED", "Rescheduled"), after[rescheduled]
    assert after[crashed][0] == "CRASHED", after[crashed]
    assert "did not finish within its 1 s drain" in after[crashed][2]
    assert "1 rescheduled" in worker.log()
    assert "1 crashed" in worker.log()
    # The slots came back with the runs, not minutes later when their leases expire.
    assert active_slots(worker.limit) == 0
    for run_id in (rescheduled, crashed):
        assert pids_with_env(FLOW_RUN_ID_ENV, str(run_id)) == [], "a flow-run process survived"


def test_a_drain_with_prefect_away_still_stops_the_runs_and_exits(
    start_worker: Callable[..., DrainingWorker], prefect_server: LocalPrefectServer
) -> None:
    worker = start_worker(drain_s=1)
    with get_client(sync_client=True) as client:
        run_id = worker.submit(client, gpu_s=120.0, env={})
        wait_until(lambda: active_slots(worker.limit) == 1, "the GPU step holds its slot", 300)
    server_pid = prefect_server.pid
    assert server_pid is not None
    os.kill(server_pid, signal.SIGSTOP)  # the API stops answering, connections hang
    try:
        worker.proc.send_signal(signal.SIGTERM)
        # Each call to Prefect gives up after 5 s: the drain ends well inside a grace period.
        assert worker.proc.wait(timeout=60) == 0, worker.log()[-3000:]
    finally:
        os.kill(server_pid, signal.SIGCONT)
    log = worker.log()
    assert "draining without the Prefect API" in log
    assert "1 not set (Prefect unreachable)" in log
    assert pids_with_env(FLOW_RUN_ID_ENV, str(run_id)) == [], "a flow-run process survived"


def test_a_killed_worker_s_runs_are_settled_by_the_next_worker_of_its_name(
    start_worker: Callable[..., DrainingWorker],
) -> None:
    first = start_worker(drain_s=0)
    with get_client(sync_client=True) as client:
        orphan = first.submit(client, gpu_s=120.0, env={})  # its process dies too
        cut_off = first.submit(client, gpu_s=120.0, env={})  # its process lives on
        wait_until(lambda: active_slots(first.limit) == 2, "both GPU steps hold a slot", 300)
        # What the OOM killer or a container restart does: no drain, no goodbye.
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
        for pid in pids_with_env(FLOW_RUN_ID_ENV, str(orphan)):
            os.kill(pid, signal.SIGKILL)
        assert pids_with_env(FLOW_RUN_ID_ENV, str(cut_off)), "its process should live on"
        assert {s[0] for s in states(client, [orphan, cut_off]).values()} == {"RUNNING"}

        second = start_worker(drain_s=0, like=first)
        wait_until(
            lambda: {s[0] for s in states(client, [orphan, cut_off]).values()} == {"CRASHED"},
            "both runs settled",
            60,
        )
        after = states(client, [orphan, cut_off])
    assert all("ended without draining" in state[2] for state in after.values()), after
    assert "settled the flow runs an earlier" in second.log()
    assert "2 crashed" in second.log()
    assert pids_with_env(FLOW_RUN_ID_ENV, str(cut_off)) == [], "a flow-run process survived"
