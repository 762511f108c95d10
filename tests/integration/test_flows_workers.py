"""The pipeline on real process workers (subprocesses) against the real test server.

Three pools, so that each scenario knows which worker runs it:
- ``two``: two workers, limit 2 each, up to 8 flow runs each;
- ``one``: one worker, limit 2 (failure, cancellation, occupy=2);
- ``bare``: one worker whose limit is deleted once it is online, then made inactive
  (the entrypoint does not start a worker before its limit exists).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelling

from pgw_flows.params import PipelineParams
from prefect_gpu_workers.local.plan import WorkerPlan, plan_workers
from prefect_gpu_workers.local.prefect_ops import (
    active_slots,
    deploy_for_local_workers,
    ensure_gpu_limit,
    ensure_process_pool,
    submit_runs,
)
from prefect_gpu_workers.local.processes import WORKER_QUERY_SECONDS_ENV
from prefect_gpu_workers.local.session import LocalSession
from prefect_gpu_workers.records import StageRecord, read_records
from prefect_gpu_workers.report import gpu_overlap_per_worker, stage_overlap_per_worker
from prefect_gpu_workers.server import LocalPrefectServer

# Workers poll every 2 s instead of 10 s: the tests wait less, nothing else changes.
POLL_SECONDS = "2"
RUN_TIMEOUT_S = 240.0
# Simulated runs with the demo's stage lengths unless a test says otherwise.
SIMULATED = PipelineParams(simulate=True, download_s=2.0, gpu_s=3.0, save_s=2.0)


@dataclass
class Pool:
    name: str
    deployment_id: UUID
    plans: tuple[WorkerPlan, ...]


@dataclass
class Workers:
    session: LocalSession
    pools: dict[str, Pool]
    records_root: Path

    def submit(self, pool: str, count: int, **parameters: Any) -> tuple[list[UUID], Path]:
        record_dir = self.records_root / uuid.uuid4().hex[:8]
        return self.submit_to(pool, count, record_dir, **parameters), record_dir

    def submit_to(self, pool: str, count: int, record_dir: Path, **parameters: Any) -> list[UUID]:
        """More runs recording into ``record_dir`` (that of an earlier submit)."""
        params = {**replace(SIMULATED, record_dir=str(record_dir)).as_parameters(), **parameters}
        with self.session.client() as client:
            return submit_runs(client, self.pools[pool].deployment_id, count, params)

    def wait(self, pool: str, ids: Sequence[UUID]) -> list[FlowRun]:
        names = [plan.limit_name for plan in self.pools[pool].plans]
        return self.session.wait_for_runs(ids, names, timeout_s=RUN_TIMEOUT_S)

    def slots(self, pool: str) -> dict[str, int]:
        with self.session.client() as client:
            return active_slots(client, [plan.limit_name for plan in self.pools[pool].plans])


@pytest.fixture(scope="module")
def workers(
    prefect_server: LocalPrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    suffix = uuid.uuid4().hex[:6]
    layout: Mapping[str, tuple[WorkerPlan, ...]] = {
        "two": plan_workers([f"two-a-{suffix}", f"two-b-{suffix}"], slots=2, flow_runs=8),
        "one": plan_workers([f"one-{suffix}"], slots=2, flow_runs=6),
        "bare": plan_workers([f"bare-{suffix}"], slots=2, flow_runs=2),
    }
    workdir = tmp_path_factory.mktemp("flows-workers")
    with LocalSession(workdir, api_url=prefect_server.api_url) as session:
        pools: dict[str, Pool] = {}
        for key, plans in layout.items():
            pool = f"test-{key}-{suffix}"
            with session.client() as client:
                ensure_process_pool(client, pool)
                for plan in plans:
                    ensure_gpu_limit(client, plan.limit_name, plan.slots)
            deployment_id = deploy_for_local_workers(pool, f"pipeline-{key}-{suffix}")
            pools[key] = Pool(pool, deployment_id, plans)
            session.start_workers(plans, pool, {WORKER_QUERY_SECONDS_ENV: POLL_SECONDS})
        for pool_ in pools.values():
            session.wait_for_workers(pool_.name)
        yield Workers(session, pools, workdir / "records")
    assert session.remaining_pids() == [], "processes left after the workers were stopped"


def _state(run: FlowRun) -> str | None:
    return run.state.type.value if run.state is not None else None


def _message(run: FlowRun) -> str:
    return (run.state.message if run.state is not None else None) or ""


def _stages(records: Sequence[StageRecord], run_id: str) -> list[str]:
    return [r.stage for r in records if r.run_id == run_id]


def test_gpu_steps_stay_within_each_workers_limit_while_io_overlaps(workers: Workers) -> None:
    # Long I/O stages so downloads and saves overlap even when flow-run start-up
    # is spread out by a busy CPU; 12 x 3 s of GPU work keeps the slots contended.
    ids, record_dir = workers.submit("two", 12, download_s=5.0, gpu_s=3.0, save_s=5.0)
    runs = workers.wait("two", ids)

    assert [_state(r) for r in runs] == ["COMPLETED"] * 12
    records = read_records(record_dir)
    gpu_steps = [r for r in records if r.stage == "gpu"]
    assert len(gpu_steps) == 12
    worker_ids = {plan.worker_id for plan in workers.pools["two"].plans}
    # Every GPU step held its own worker's limit: WORKER_ID reached the flow run.
    assert {r.worker_id for r in gpu_steps} == worker_ids
    assert all(r.limit == f"gpu:{r.worker_id}" for r in gpu_steps)
    peaks = gpu_overlap_per_worker(records)
    assert max(peaks.values()) == 2, f"no worker ever ran 2 GPU steps at once: {peaks}"
    assert all(peak <= 2 for peak in peaks.values()), f"a limit was exceeded: {peaks}"
    io_peaks = stage_overlap_per_worker(records, ("download", "save"))
    assert max(io_peaks.values()) > 2, f"download/save did not overlap freely: {io_peaks}"
    assert workers.slots("two") == {plan.limit_name: 0 for plan in workers.pools["two"].plans}


def test_missing_then_inactive_limit_fails_the_run_before_the_gpu_step(workers: Workers) -> None:
    (plan,) = workers.pools["bare"].plans
    with workers.session.client() as client:
        client.delete_global_concurrency_limit_by_name(plan.limit_name)
    ids, record_dir = workers.submit("bare", 1)
    (run,) = workers.wait("bare", ids)
    assert _state(run) == "FAILED"
    message = _message(run)
    assert f"{plan.limit_name}' does not exist" in message
    assert f"prefect gcl create {plan.limit_name} --limit" in message
    assert _stages(read_records(record_dir), str(run.id)) == ["download"]

    with workers.session.client() as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=plan.limit_name, limit=2, active=False)
        )
    ids, record_dir = workers.submit("bare", 1)
    (run,) = workers.wait("bare", ids)
    assert _state(run) == "FAILED"
    message = _message(run)
    assert f"{plan.limit_name}' is inactive" in message
    assert f"prefect gcl enable {plan.limit_name}" in message
    assert _stages(read_records(record_dir), str(run.id)) == ["download"]


def test_gpu_step_that_raises_releases_its_slot(workers: Workers) -> None:
    ids, record_dir = workers.submit("one", 1, fail_in_gpu_step=True, occupy=2)
    (run,) = workers.wait("one", ids)
    assert _state(run) == "FAILED"
    assert "InjectedGpuFailure" in _message(run)
    # The step held both slots (it got as far as recording inside the block) ...
    (step,) = [r for r in read_records(record_dir) if r.stage == "gpu"]
    assert step.occupy == 2
    # ... and gave them back: nothing is held, and a step needing both runs.
    assert set(workers.slots("one").values()) == {0}
    ids, _ = workers.submit("one", 1, occupy=2)
    (run,) = workers.wait("one", ids)
    assert _state(run) == "COMPLETED"


def test_cancelled_run_releases_its_slot(workers: Workers) -> None:
    ids, record_dir = workers.submit("one", 1, gpu_s=180.0)
    (run_id,) = ids
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while set(workers.slots("one").values()) != {1}:
        assert time.monotonic() < deadline, "the GPU step never took its slot"
        time.sleep(0.5)

    with workers.session.client() as client:
        client.set_flow_run_state(run_id, Cancelling(message="cancelled by the test"))
    cancelled_at = time.time()
    (run,) = workers.wait("one", ids)
    assert _state(run) == "CANCELLED"
    deadline = time.monotonic() + 30
    while set(workers.slots("one").values()) != {0}:
        assert time.monotonic() < deadline, "the cancelled run kept its slot"
        time.sleep(0.5)
    (step,) = [r for r in read_records(record_dir) if r.stage == "gpu"]
    assert step.end < cancelled_at + 30, "the GPU step ran on after the cancellation"
    assert "save" not in _stages(read_records(record_dir), str(run_id))


def test_occupy_two_excludes_every_other_gpu_step_on_the_worker(workers: Workers) -> None:
    # The small steps first; the big run is submitted only while two of them hold
    # both slots, so it must wait for them: built in, not left to timing.
    small_ids, record_dir = workers.submit("one", 4, download_s=0.0, gpu_s=8.0, save_s=0.0)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while sum(workers.slots("one").values()) < 2:
        assert time.monotonic() < deadline, "the small steps never held both slots"
        time.sleep(0.2)
    big_ids = workers.submit_to("one", 1, record_dir, occupy=2, download_s=0.0, gpu_s=5.0)
    runs = workers.wait("one", [*big_ids, *small_ids])
    assert [_state(r) for r in runs] == ["COMPLETED"] * len(runs)

    gpu_steps = [r for r in read_records(record_dir) if r.stage == "gpu"]
    (big,) = [r for r in gpu_steps if r.occupy == 2]
    small = [r for r in gpu_steps if r.occupy == 1]
    assert len(small) == 4
    for step in small:
        assert step.end <= big.start or step.start >= big.end, "a step ran beside occupy=2"
    assert gpu_overlap_per_worker(gpu_steps) == {big.worker_id: 2}
    # Not vacuous: the big run was submitted while two small steps held both slots,
    # so it could only start once both had ended (whenever its process started).
    assert big.start >= sorted(step.end for step in small)[1], "occupy=2 ran before a slot freed"
