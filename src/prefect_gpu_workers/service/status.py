"""``prefect-gpu-workers status``: limits, what holds them, and the workers behind them.

A row per worker id with a limit named ``{limit prefix}:{worker id}``: its
size, the slots in use now (Prefect's ``active_slots``; Prefect keeps no list
of lease holders, so the holder shown is the worker the limit belongs to), its
memory limit ``{limit prefix}-memory:{worker id}`` (GiB held of its size)
where it has one, and that worker's Prefect record (status, last heartbeat).
A prefix ending in ``-memory`` is read as a memory limit's (the naming
contract's suffix); one whose slot limit is gone gets a row of its own. With
``--pool``, only the limits of that pool's workers, plus its workers that have
no limit (their GPU steps fail closed with ``gpu_slot``, or run unlimited with
a plain ``concurrency()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect.client.orchestration import SyncPrefectClient
from rich.table import Table

from prefect_gpu_workers.naming import MEMORY_LIMIT_SUFFIX, parse_limit_name
from prefect_gpu_workers.service import prefect_ops
from prefect_gpu_workers.service.plan import WorkerSighting


@dataclass(frozen=True)
class LimitUse:
    """One Prefect limit: its size and what is held of it (slots, or GiB)."""

    name: str
    size: int
    in_use: int
    active: bool


@dataclass(frozen=True)
class LimitStatus:
    """A worker id's limits: its slot limit and its memory limit (either may be missing)."""

    limit_prefix: str
    worker_id: str
    slots: LimitUse | None
    memory: LimitUse | None
    workers: tuple[WorkerSighting, ...]

    @property
    def name(self) -> str:
        """The slot limit's name, else the memory limit's."""
        use = self.slots or self.memory
        assert use is not None, "a row has at least one limit"
        return use.name


@dataclass(frozen=True)
class PoolStatus:
    limits: tuple[LimitStatus, ...]
    # Workers (of the chosen pool) with no limit of their name.
    workers_without_limit: tuple[WorkerSighting, ...]


def read_status(client: SyncPrefectClient, pool: str | None = None) -> PoolStatus:
    """What the server knows now; ``pool`` narrows it to one work pool's workers."""
    pools = [pool] if pool is not None else [p.name for p in prefect_ops.all_pools(client)]
    sightings = [
        prefect_ops.sighting(name, worker)
        for name in pools
        for worker in prefect_ops.pool_workers(client, name)
    ]
    by_name: dict[str, list[WorkerSighting]] = {}
    for seen in sightings:
        by_name.setdefault(seen.name, []).append(seen)
    # (limit prefix, worker id) -> [slot limit, memory limit]
    rows: dict[tuple[str, str], list[LimitUse | None]] = {}
    for limit in prefect_ops.all_limits(client):
        parsed = parse_limit_name(limit.name)
        if parsed is None:
            continue  # not a per-worker limit
        prefix, worker_id = parsed
        base = prefix.removesuffix(MEMORY_LIMIT_SUFFIX)
        kind = 1 if base and base != prefix else 0
        use = LimitUse(limit.name, limit.limit, limit.active_slots, limit.active)
        rows.setdefault((base if kind else prefix, worker_id), [None, None])[kind] = use
    limits = [
        LimitStatus(prefix, worker_id, slots, memory, tuple(by_name.get(worker_id, ())))
        for (prefix, worker_id), (slots, memory) in rows.items()
    ]
    if pool is not None:
        limits = [status for status in limits if status.workers]
    limited = {status.worker_id for status in limits}
    without = tuple(s for s in sightings if s.name not in limited)
    return PoolStatus(tuple(sorted(limits, key=lambda s: s.name)), without)


def _age(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = max(0, int((now - when).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _worker_cells(workers: Sequence[WorkerSighting], now: datetime) -> tuple[str, str, str]:
    if not workers:
        return "-", "[red]no worker[/red]", "-"
    pools = ", ".join(w.pool for w in workers)
    states = ", ".join(
        "[green]ONLINE[/green]" if w.online else "[yellow]OFFLINE[/yellow]" for w in workers
    )
    beats = ", ".join(_age(w.last_heartbeat, now) for w in workers)
    return pools, states, beats


def _used(use: LimitUse | None, unit: str = "") -> str:
    if use is None:
        return "-"
    used = f"{use.in_use}/{use.size}{unit}"
    if not use.active:
        return used + " [yellow](inactive)[/yellow]"
    return f"[bold]{used}[/bold]" if use.in_use >= use.size else used


def render_status(status: PoolStatus, now: datetime | None = None) -> Table:
    """A table a person reads at a glance: one row per worker's limits, then workers without."""
    now = now or datetime.now(UTC)
    table = Table(title="GPU limits and their workers", title_justify="left")
    columns = ("limit", "slots in use", "GPU memory in use", "worker", "pool", "worker status",
               "heartbeat")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right" if "in use" in column else "left")
    for limit in status.limits:
        table.add_row(
            limit.name,
            _used(limit.slots),
            _used(limit.memory, " GiB"),
            limit.worker_id,
            *_worker_cells(limit.workers, now),
        )
    for worker in status.workers_without_limit:
        table.add_row("[red]none[/red]", "-", "-", worker.name, *_worker_cells([worker], now))
    if not status.limits and not status.workers_without_limit:
        table.caption = "no per-worker limit and no worker"
    return table


def _sighting_json(seen: WorkerSighting) -> dict[str, Any]:
    return {
        "name": seen.name,
        "pool": seen.pool,
        "status": "ONLINE" if seen.online else "OFFLINE",
        "last_heartbeat": seen.last_heartbeat.isoformat() if seen.last_heartbeat else None,
        "heartbeat_interval_s": seen.heartbeat_interval_s,
    }


def status_json(status: PoolStatus) -> dict[str, Any]:
    """The same as :func:`render_status`, as one JSON-ready object.

    Each limit's ``size``, ``in_use`` and ``active`` are its slot limit's
    (``null`` where only a memory limit is left); ``memory`` is its memory
    limit (``size_gib``, ``in_use_gib``, ``active``, ``name``) or ``null``.
    """
    return {
        "limits": [
            {
                "name": limit.name,
                "limit_prefix": limit.limit_prefix,
                "worker_id": limit.worker_id,
                "size": limit.slots.size if limit.slots else None,
                "in_use": limit.slots.in_use if limit.slots else None,
                "active": limit.slots.active if limit.slots else None,
                "memory": None
                if limit.memory is None
                else {
                    "name": limit.memory.name,
                    "size_gib": limit.memory.size,
                    "in_use_gib": limit.memory.in_use,
                    "active": limit.memory.active,
                },
                "workers": [_sighting_json(w) for w in limit.workers],
            }
            for limit in status.limits
        ],
        "workers_without_limit": [_sighting_json(w) for w in status.workers_without_limit],
    }
