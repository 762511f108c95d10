"""The service treats a worker's memory limit exactly as its slot limit: created
fresh (a stale one taken over), recreated after a crash, put back when changed,
deleted on stop; and `status` reads the two together. A fake Prefect client
stands in for the server (the real one: tests/integration/test_start_service.py)."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from prefect.exceptions import ObjectNotFound

from prefect_gpu_workers.gpu import GpuInventory
from prefect_gpu_workers.service.plan import WorkerSighting
from prefect_gpu_workers.service.run import StartOptions, StartService, build_plan
from prefect_gpu_workers.service.status import LimitUse, read_status

_ids = itertools.count(1)


@dataclass
class FakeLimits:
    """The global concurrency limits and worker records of a fake Prefect server."""

    limits: dict[str, SimpleNamespace] = field(default_factory=dict)
    workers: dict[str, list[SimpleNamespace]] = field(default_factory=dict)

    def add(self, name: str, size: int, held: int = 0, active: bool = True) -> None:
        self.limits[name] = SimpleNamespace(
            id=next(_ids), name=name, limit=size, active_slots=held, active=active
        )

    def sizes(self) -> dict[str, tuple[int, int, bool]]:
        return {n: (x.limit, x.active_slots, x.active) for n, x in sorted(self.limits.items())}

    def read_global_concurrency_limit_by_name(self, name: str) -> SimpleNamespace:
        if name not in self.limits:
            raise ObjectNotFound(http_exc=Exception(name))
        return SimpleNamespace(**vars(self.limits[name]))  # a snapshot, as a read is

    def create_global_concurrency_limit(self, create: Any) -> None:
        assert create.name not in self.limits
        self.add(create.name, create.limit, active=create.active)

    def update_global_concurrency_limit(self, name: str, update: Any) -> None:
        self.limits[name].limit, self.limits[name].active = update.limit, update.active

    def delete_global_concurrency_limit_by_name(self, name: str) -> None:
        if self.limits.pop(name, None) is None:
            raise ObjectNotFound(http_exc=Exception(name))

    def read_global_concurrency_limits(self, limit: int, offset: int) -> list[SimpleNamespace]:
        return list(self.limits.values())[offset : offset + limit]

    def read_work_pools(self, limit: int, offset: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=pool) for pool in self.workers][offset : offset + limit]

    def read_workers_for_work_pool(
        self, pool: str, offset: int, limit: int
    ) -> list[SimpleNamespace]:
        return self.workers.get(pool, [])[offset : offset + limit]

    def request(self, method: str, path: str, path_params: dict[str, str]) -> None:
        assert method == "DELETE"
        records = self.workers.get(path_params["work_pool_name"], [])
        records[:] = [w for w in records if w.name != path_params["name"]]


def _service(options: StartOptions) -> tuple[StartService, FakeLimits, list[str]]:
    """A service on a fake server that starts no process: a "started" worker stops its loop."""
    said: list[str] = []
    started = StartService(options, said.append, env={}, inventory=GpuInventory())
    fake = FakeLimits()
    client: Any = fake
    started._client = lambda: contextlib.nullcontext(client)  # type: ignore[method-assign]
    started._start = lambda state: started.stop_requested.set()  # type: ignore[method-assign]
    started._stop_own = lambda name, grace_s: []  # type: ignore[method-assign]
    return started, fake, said


@pytest.fixture
def service() -> tuple[StartService, FakeLimits, list[str]]:
    return _service(
        StartOptions("pool", worker_id="box", per_gpu=True, gpus=2, gpu_memory_mib=40960)
    )


def _serve(started: StartService) -> None:
    plan, _ = build_plan(started.options, GpuInventory(), {}, "host")
    started._serve(plan)


def test_memory_limits_are_created_beside_slot_limits_and_deleted_on_stop(
    service: tuple[StartService, FakeLimits, list[str]],
) -> None:
    started, fake, said = service
    # A stopped service's memory limit, with GiB its dead runs held: taken over.
    fake.add("gpu-memory:box-gpu0", 7, held=3)
    stale_id = fake.limits["gpu-memory:box-gpu0"].id
    _serve(started)
    assert fake.sizes() == {
        "gpu-memory:box-gpu0": (40, 0, True),
        "gpu-memory:box-gpu1": (40, 0, True),
        "gpu:box-gpu0": (1, 0, True),
        "gpu:box-gpu1": (1, 0, True),
    }
    assert fake.limits["gpu-memory:box-gpu0"].id != stale_id
    assert (
        "took over limit gpu-memory:box-gpu0 left by a stopped service "
        "(3/7 GiB held by dead holders): recreated with 40 GiB, 0 in use"
    ) in said
    assert "created limit gpu-memory:box-gpu1 with 40 GiB" in said
    assert "created limit gpu:box-gpu1 with 1 slot(s)" in said

    started._cleanup()
    assert fake.limits == {}
    for name in ("gpu:box-gpu0", "gpu-memory:box-gpu0", "gpu:box-gpu1", "gpu-memory:box-gpu1"):
        assert f"deleted limit {name}" in said


def test_a_changed_memory_limit_is_put_back_and_recreated_after_a_crash(
    service: tuple[StartService, FakeLimits, list[str]],
) -> None:
    started, fake, said = service
    _serve(started)
    fake.update_global_concurrency_limit(
        "gpu-memory:box-gpu0", SimpleNamespace(limit=10, active=False)
    )
    fake.delete_global_concurrency_limit_by_name("gpu-memory:box-gpu1")
    started._reconcile()
    assert fake.sizes()["gpu-memory:box-gpu0"] == (40, 0, True)
    assert fake.sizes()["gpu-memory:box-gpu1"] == (40, 0, True)
    assert "limit gpu-memory:box-gpu0 had 10 GiB, inactive: resized to 40 GiB, active" in said
    assert "limit gpu-memory:box-gpu1 was gone: created it again with 40 GiB" in said

    # The worker crashes while its runs hold 25 GiB: both its limits start again at 0.
    fake.limits["gpu-memory:box-gpu0"].active_slots = 25
    old_ids = {name: fake.limits[name].id for name in ("gpu:box-gpu0", "gpu-memory:box-gpu0")}
    state = started.running["box-gpu0"]
    state.proc = SimpleNamespace(poll=lambda: 1, returncode=1)  # type: ignore[assignment]
    assert started._supervise(state) is False
    assert (
        "recreated limit gpu-memory:box-gpu0 after its worker crashed (25/40 GiB held by "
        "dead holders): 40 GiB, 0 in use"
    ) in said
    assert all(fake.limits[name].id != old for name, old in old_ids.items())
    assert fake.sizes()["gpu-memory:box-gpu0"] == (40, 0, True)


def test_a_service_without_known_memory_makes_no_memory_limit() -> None:
    started, fake, _ = _service(StartOptions("pool", worker_id="box", gpus=2))
    _serve(started)
    assert fake.sizes() == {"gpu:box": (2, 0, True)}


def _worker(pool: str, name: str) -> SimpleNamespace:
    return SimpleNamespace(
        name=name,
        status=SimpleNamespace(value="ONLINE"),
        last_heartbeat_time=None,
        heartbeat_interval_seconds=30,
    )


def test_status_shows_each_workers_memory_limit_on_its_slot_limits_row() -> None:
    fake = FakeLimits(workers={"pool": [_worker("pool", "a"), _worker("pool", "b")]})
    fake.add("gpu:a", 2, held=1)
    fake.add("gpu-memory:a", 80, held=24)
    fake.add("gpu:b", 1)
    fake.add("gpu-memory:gone", 40, held=5)  # its slot limit and worker are gone
    fake.add("gpu:other-pool", 1)  # a worker of no pool read here
    fake.add("not a worker limit", 3)
    status = read_status(fake)  # type: ignore[arg-type]
    rows = {row.name: (row.slots, row.memory, row.workers) for row in status.limits}
    seen = WorkerSighting("pool", "a", True, None, 30.0)
    assert rows["gpu:a"] == (
        LimitUse("gpu:a", 2, 1, True),
        LimitUse("gpu-memory:a", 80, 24, True),
        (seen,),
    )
    assert rows["gpu:b"][1] is None
    assert rows["gpu-memory:gone"] == (None, LimitUse("gpu-memory:gone", 40, 5, True), ())
    assert set(rows) == {"gpu:a", "gpu:b", "gpu-memory:gone", "gpu:other-pool"}
    narrowed = read_status(fake, "pool")  # type: ignore[arg-type]
    assert [row.name for row in narrowed.limits] == ["gpu:a", "gpu:b"]
