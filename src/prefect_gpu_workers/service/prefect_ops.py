"""The Prefect calls a ``start`` service makes: work pool, slot and memory limits, workers.

Synchronous client (the service is a plain loop); every function takes the
client so that a caller opens one per step. Pages of 200: the server caps one
read at ``PREFECT_API_DEFAULT_LIMIT``.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
)
from prefect.client.schemas.objects import Worker, WorkPool
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from prefect_gpu_workers.service.plan import PlannedLimit, WorkerSighting

PAGE = 200


def ensure_process_pool(client: SyncPrefectClient, pool: str) -> bool:
    """Create the process work pool unless it exists; True when created.

    Raises:
        RuntimeError: the pool exists with another type.
    """
    try:
        existing = client.read_work_pool(pool)
    except ObjectNotFound:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            return True
        except ObjectAlreadyExists:  # another machine's service created it just now
            existing = client.read_work_pool(pool)
    if existing.type != "process":
        raise RuntimeError(f"work pool {pool!r} exists with type {existing.type!r}, not 'process'")
    return False


def all_pools(client: SyncPrefectClient) -> Iterator[WorkPool]:
    offset = 0
    while True:
        page = client.read_work_pools(limit=PAGE, offset=offset)
        yield from page
        if len(page) < PAGE:
            return
        offset += PAGE


def pool_workers(client: SyncPrefectClient, pool: str) -> list[Worker]:
    workers: list[Worker] = []
    while True:
        # Prefect's client puts the name into the path as it is: a pool named
        # "a?b" (someone else's) would turn into a query. Quote it.
        page = client.read_workers_for_work_pool(
            quote(pool, safe=""), offset=len(workers), limit=PAGE
        )
        workers.extend(page)
        if len(page) < PAGE:
            return workers


def sightings(client: SyncPrefectClient, names: set[str]) -> list[WorkerSighting]:
    """Worker records with one of ``names``, in every work pool (limit names are global)."""
    found: list[WorkerSighting] = []
    for pool in all_pools(client):
        for worker in pool_workers(client, pool.name):
            if worker.name in names:
                found.append(sighting(pool.name, worker))
    return found


def sighting(pool: str, worker: Worker) -> WorkerSighting:
    interval = worker.heartbeat_interval_seconds
    return WorkerSighting(
        pool=pool,
        name=worker.name,
        online=worker.status.value == "ONLINE",
        last_heartbeat=worker.last_heartbeat_time,
        heartbeat_interval_s=float(interval) if interval else None,
    )


def read_limit(client: SyncPrefectClient, name: str) -> GlobalConcurrencyLimitResponse | None:
    try:
        return client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return None


def all_limits(client: SyncPrefectClient) -> list[GlobalConcurrencyLimitResponse]:
    limits: list[GlobalConcurrencyLimitResponse] = []
    while True:
        page = client.read_global_concurrency_limits(limit=PAGE, offset=len(limits))
        limits.extend(page)
        if len(page) < PAGE:
            return limits


def _create(client: SyncPrefectClient, limit: PlannedLimit) -> None:
    client.create_global_concurrency_limit(
        GlobalConcurrencyLimitCreate(name=limit.name, limit=limit.size, active=True)
    )


def recreate_limit(
    client: SyncPrefectClient, limit: PlannedLimit, after_crash: bool = False
) -> str:
    """Create the limit (a slot or a memory limit) fresh, deleting one of that
    name first; says what it found.

    Only called once the name is known not to be live, or its worker crashed
    and its flow runs were stopped: anything the old limit holds belongs to a
    dead holder. Leases of a deleted limit can never
    decrement a new limit of the same name (it has a new id and starts at 0),
    so recreating drops those slots instead of adding the new worker's on top.
    """
    name, size = limit.name, limit.amount(limit.size)
    old = read_limit(client, name)
    if old is not None:
        client.delete_global_concurrency_limit_by_name(name)
    _create(client, limit)
    if old is None:
        return f"created limit {name} with {size}"
    held = f"{old.active_slots}/{limit.amount(old.limit)} held by dead holders"
    if after_crash:
        return f"recreated limit {name} after its worker crashed ({held}): {size}, 0 in use"
    return (
        f"took over limit {name} left by a stopped service ({held}): "
        f"recreated with {size}, 0 in use"
    )


def enforce_limit(client: SyncPrefectClient, limit: PlannedLimit) -> str | None:
    """Put the limit back as planned if someone changed it; a message when it acted."""
    name, size = limit.name, limit.amount(limit.size)
    found = read_limit(client, name)
    if found is None:
        _create(client, limit)
        return f"limit {name} was gone: created it again with {size}"
    if found.limit != limit.size or not found.active:
        client.update_global_concurrency_limit(
            name, GlobalConcurrencyLimitUpdate(limit=limit.size, active=True)
        )
        was = f"{limit.amount(found.limit)}{'' if found.active else ', inactive'}"
        return f"limit {name} had {was}: resized to {size}, active"
    return None


def delete_limit(client: SyncPrefectClient, name: str) -> bool:
    """Delete the limit; False when it was already gone."""
    try:
        client.delete_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return False
    return True


def delete_worker_record(client: SyncPrefectClient, pool: str, name: str) -> bool:
    """Forget the worker in the pool, so the name is free at once; False when unknown."""
    try:
        client.request(
            "DELETE",
            "/work_pools/{work_pool_name}/workers/{name}",
            path_params={"work_pool_name": pool, "name": name},
        )
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return False
        raise
    return True
