"""Local mode's calls to Prefect: pool, limits, deployment, runs (a sync client each)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
)
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    WorkerFilter,
    WorkerFilterStatus,
)
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectNotFound

from pgw_flows.deploy import deploy_pipeline


def ensure_process_pool(client: SyncPrefectClient, pool: str) -> None:
    """Create the process work pool ``pool`` unless it exists.

    Raises:
        RuntimeError: a pool of that name exists with another type.
    """
    try:
        existing = client.read_work_pool(pool)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        return
    if existing.type != "process":
        raise RuntimeError(f"work pool {pool!r} exists with type {existing.type!r}, not 'process'")


def ensure_gpu_limit(client: SyncPrefectClient, name: str, slots: int) -> None:
    """Create the limit, or make an existing one active with ``slots`` slots."""
    try:
        client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=slots, active=True)
        )
        return
    client.update_global_concurrency_limit(
        name, GlobalConcurrencyLimitUpdate(limit=slots, active=True)
    )


def active_slots(client: SyncPrefectClient, names: Sequence[str]) -> dict[str, int]:
    """Slots held now, per limit name (0 for a limit that does not exist)."""
    held: dict[str, int] = {}
    for name in names:
        try:
            held[name] = int(client.read_global_concurrency_limit_by_name(name).active_slots)
        except ObjectNotFound:
            held[name] = 0
    return held


def online_workers(client: SyncPrefectClient, pool: str) -> set[str]:
    """Names of the workers of ``pool`` that Prefect sees ONLINE."""
    online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
    return {w.name for w in client.read_workers_for_work_pool(pool, worker_filter=online)}


def submit_runs(
    client: SyncPrefectClient,
    deployment_id: UUID,
    count: int,
    parameters: Mapping[str, Any],
    tags: Sequence[str] = (),
) -> list[UUID]:
    """Create ``count`` flow runs of the deployment; returns their ids."""
    return submit_each(client, deployment_id, [parameters] * count, tags)


def submit_each(
    client: SyncPrefectClient,
    deployment_id: UUID,
    parameters: Sequence[Mapping[str, Any]],
    tags: Sequence[str] = (),
) -> list[UUID]:
    """Create one flow run of the deployment per entry of ``parameters``; returns their ids."""
    return [
        client.create_flow_run_from_deployment(
            deployment_id, parameters=dict(each), tags=list(tags)
        ).id
        for each in parameters
    ]


def read_runs(client: SyncPrefectClient, ids: Sequence[UUID]) -> list[FlowRun]:
    """The flow runs with these ids, however many."""
    # Pages of 200: the API caps one read at PREFECT_API_DEFAULT_LIMIT.
    runs: list[FlowRun] = []
    for offset in range(0, len(ids), 200):
        page = list(ids[offset : offset + 200])
        runs.extend(
            client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page)
            )
        )
    return runs


def last_end_time(runs: Sequence[FlowRun]) -> float | None:
    """The latest end time among ``runs`` (a ``time.time()``), if any ended."""
    ends = [run.end_time.timestamp() for run in runs if run.end_time is not None]
    return max(ends) if ends else None


def local_job_variables() -> dict[str, Any]:
    """Job variables for deployments that local workers run.

    An explicit ``command`` makes the process worker start the engine
    directly. Without it, Prefect 3.9 first starts a workspace-resolving
    Python process per flow run: a second interpreter start-up for every run
    (docs/benchmarks.md has the CPU it costs), which buys nothing for a module entrypoint
    with no pull steps. The interpreter is this one: local workers share it.
    """
    return {"command": shlex.join([sys.executable, "-m", "prefect.engine"])}


def deploy_for_local_workers(pool: str, deployment_name: str) -> UUID:
    """Deploy the pipeline to ``pool`` for workers that share this interpreter."""
    return deploy_pipeline(pool, deployment_name, job_variables=local_job_variables())
