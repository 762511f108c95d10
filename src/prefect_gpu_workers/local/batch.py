"""One batch on a local session: set up the pool, submit runs, wait, measure."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from uuid import UUID

from prefect.client.schemas.objects import FlowRun

from pgw_flows.params import PipelineParams
from prefect_gpu_workers.local.plan import WorkerPlan, count_runs
from prefect_gpu_workers.local.prefect_ops import (
    active_slots,
    deploy_for_local_workers,
    ensure_gpu_limit,
    ensure_process_pool,
    last_end_time,
    submit_each,
)
from prefect_gpu_workers.local.session import LocalSession, ProgressCallback
from prefect_gpu_workers.local.watch import LatencySummary
from prefect_gpu_workers.records import StageRecord, read_records
from prefect_gpu_workers.report import PhaseMetrics, summarize


@dataclass(frozen=True)
class BatchResult:
    """What one batch did: its runs, their stage records, the measurements."""

    runs: list[FlowRun]
    records: list[StageRecord]
    metrics: PhaseMetrics
    # Slots still held once every run is final: anything but 0 is a leak.
    slots_held_after: dict[str, int]
    # Wall-clock (time.time()) when the runs were submitted and when the last one ended.
    submitted_at: float
    ended_at: float
    # Duration of the progress polls' API requests, as this client saw them.
    api_latency: LatencySummary
    # The runs' ids in the order they were submitted (the ``vary`` index).
    submitted: tuple[UUID, ...] = ()

    def failure_messages(self, most: int = 3) -> list[str]:
        """``name: STATE message`` of up to ``most`` runs that did not complete."""
        messages = [
            f"{run.name}: {run.state.type.value} {run.state.message or ''}".strip()
            for run in self.runs
            if run.state is not None and run.state.is_final() and not run.state.is_completed()
        ]
        return messages[:most]


def prepare_pool(
    session: LocalSession, pool: str, plans: Sequence[WorkerPlan], deployment_name: str
) -> UUID:
    """Pool, one limit per worker, and the deployment; returns the deployment id.

    Call it before :meth:`LocalSession.start_workers`: a worker starts only
    once its limit exists.
    """
    with session.client() as client:
        ensure_process_pool(client, pool)
        for plan in plans:
            ensure_gpu_limit(client, plan.limit_name, plan.slots)
            if plan.memory_limit_name is not None:
                ensure_gpu_limit(client, plan.memory_limit_name, plan.memory_limit_gib)
    return deploy_for_local_workers(pool, deployment_name)


def _same(index: int, params: PipelineParams) -> PipelineParams:
    return params


def run_batch(
    session: LocalSession,
    deployment_id: UUID,
    plans: Sequence[WorkerPlan],
    params: PipelineParams,
    runs: int,
    record_dir: Path,
    on_progress: ProgressCallback | None = None,
    timeout_s: float = 900.0,
    vary: Callable[[int, PipelineParams], PipelineParams] | None = None,
) -> BatchResult:
    """Submit ``runs`` flow runs, wait for all of them, and measure what happened.

    Every run records its stages in ``record_dir`` (it replaces ``params.record_dir``).
    ``vary`` gives the ``index``-th run its own parameters (a memory mix).
    """
    record_dir.mkdir(parents=True, exist_ok=True)
    limit_names = [plan.limit_name for plan in plans]
    base = replace(params, record_dir=str(record_dir))
    per_run = [(vary or _same)(index, base).as_parameters() for index in range(runs)]
    with session.client() as client:
        submitted_at = time.time()
        ids = submit_each(client, deployment_id, per_run)
    final, api_latency = session.watch_runs(
        ids, limit_names, on_progress, timeout_s, since=submitted_at
    )
    counts = count_runs(final)
    records = read_records(record_dir)
    ended_at = last_end_time(final) or time.time()
    metrics = summarize(
        records,
        {plan.worker_id: plan.slots for plan in plans},
        submitted=runs,
        finished=counts.completed,
        failed=counts.failed,
        submitted_at=submitted_at,
        ended_at=ended_at,
    )
    with session.client() as client:
        held = active_slots(client, limit_names)
    return BatchResult(
        final, records, metrics, held, submitted_at, ended_at, api_latency, tuple(ids)
    )
