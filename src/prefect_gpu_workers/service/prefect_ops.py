"""The Prefect calls a ``start`` service makes: work pool, limits, worker records.

Synchronous client (the service is a plain loop); every function takes the
client so that a caller opens one per step. Pages of 200: the server caps one
read at ``PREFECT_API_DEFAULT_LIMIT``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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

from prefect_gpu_workers.service.plan import WorkerSighting

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


def recreate_limit(
    client: SyncPrefectClient, name: str, slots: int, after_crash: bool = False
) -> str:
    """Create the limit fresh, deleting one of that name first; says what it found.

    Only called once the name is known not to be live, or its worker crashed
    and its flow runs were stopped: any slot the old limit holds belongs to a
    dead holder. Leases of a deleted limit can never
    decrement a new limit of the same name (it has a new id and starts at 0),
    so recreating drops those slots instead of adding the new worker's on top.
    """
    old = read_limit(client, name)
    if old is not None:
        client.delete_global_concurrency_limit_by_name(name)
    client.create_global_concurrency_limit(
        GlobalConcurrencyLimitCreate(name=name, limit=slots, active=True)
    )
    if old is None:
        return f"created limit {name} with {slots} slot(s)"
    held = f"{old.active_slots}/{old.limit} slot(s) held by dead holders"
    if after_crash:
        return (
            f"recreated limit {name} after its worker crashed ({held}): {slots} slot(s), 0 in use"
        )
    return (
        f"took over limit {name} left by a stopped service ({held}): "
        f"recreated with {slots} slot(s), 0 in use"
    )


def enforce_limit(client: SyncPrefectClient, name: str, slots: int) -> str | None:
    """Put the limit back as planned if someone changed it; a message when it acted."""
    limit = read_limit(client, name)
    if limit is None:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=slots, active=True)
        )
        return f"limit {name} was gone: created it again with {slots} slot(s)"
    if limit.limit != slots or not limit.active:
        client.update_global_concurrency_limit(
            name, GlobalConcurrencyLimitUpdate(limit=slots, active=True)
        )
        was = f"{limit.limit} slot(s){'' if limit.active else ', inactive'}"
        return f"limit {name} had {was}: resized to {slots} slot(s), active"
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


@dataclass(frozen=True)
class LimitRow:
    """One limit as ``status`` shows it, with the worker records of its worker id."""

    name: str
    limit_prefix: str
    worker_id: str
    size: int
    in_use: int
    active: bool
    workers: tuple[WorkerSighting, ...]
