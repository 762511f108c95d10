"""The GPU-step context managers against a real Prefect server."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from prefect_gpu_workers.server import LocalPrefectServer
from prefect_gpu_workers.slots.client import GpuLimitUnavailable, agpu_slot, gpu_slot

pytestmark = pytest.mark.usefixtures("prefect_server")


def _worker() -> str:
    return f"w-{uuid.uuid4().hex[:8]}"


def _create(name: str, limit: int, active: bool = True) -> None:
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit, active=active)
        )


def _active_slots(name: str) -> int:
    with get_client(sync_client=True) as client:
        return int(client.read_global_concurrency_limit_by_name(name).active_slots)


def test_missing_limit_fails_closed_and_says_how_to_create_it() -> None:
    worker = _worker()
    ran = False
    with pytest.raises(GpuLimitUnavailable) as info, gpu_slot(worker_id=worker):
        ran = True
    assert not ran
    assert f"gpu:{worker}" in str(info.value)
    assert f"prefect gcl create gpu:{worker} --limit" in str(info.value)


def test_inactive_limit_fails_closed() -> None:
    worker = _worker()
    _create(f"gpu:{worker}", 2, active=False)
    with (
        pytest.raises(GpuLimitUnavailable, match=r"is inactive.*prefect gcl enable"),
        gpu_slot(worker_id=worker),
    ):
        pytest.fail("the GPU step ran under an inactive limit")


def test_occupy_above_limit_fails_instead_of_waiting_forever() -> None:
    worker = _worker()
    _create(f"gpu:{worker}", 1)
    with pytest.raises(GpuLimitUnavailable, match="has 1 slot"), gpu_slot(3, worker_id=worker):
        pytest.fail("unreachable")


def test_worker_id_defaults_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = _worker()
    _create(f"gpu:{worker}", 1)
    monkeypatch.setenv("WORKER_ID", worker)
    with gpu_slot() as name:
        assert name == f"gpu:{worker}"
        assert _active_slots(name) == 1
    assert _active_slots(name) == 0


def test_slot_released_when_the_step_raises() -> None:
    worker = _worker()
    name = f"gpu:{worker}"
    _create(name, 2)
    held: list[int] = []

    def failing_step() -> None:
        with gpu_slot(2, worker_id=worker):
            held.append(_active_slots(name))
            raise RuntimeError("inference blew up")

    with pytest.raises(RuntimeError, match="inference blew up"):
        failing_step()
    assert held == [2]
    assert _active_slots(name) == 0


def test_async_slot_released_on_cancellation() -> None:
    worker = _worker()
    name = f"gpu:{worker}"
    _create(name, 1)

    async def step(entered: asyncio.Event) -> None:
        async with agpu_slot(worker_id=worker):
            entered.set()
            await asyncio.sleep(60)

    async def main() -> None:
        entered = asyncio.Event()
        task = asyncio.create_task(step(entered))
        await asyncio.wait_for(entered.wait(), 30)
        assert _active_slots(name) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _active_slots(name) == 0


def test_occupy_two_of_two_excludes_every_other_step(prefect_server: LocalPrefectServer) -> None:
    worker = _worker()
    _create(f"gpu:{worker}", 2)
    intervals: list[tuple[str, float, float]] = []

    async def step(kind: str, occupy: int) -> None:
        async with agpu_slot(occupy, worker_id=worker):
            start = time.monotonic()
            await asyncio.sleep(0.6)
            intervals.append((kind, start, time.monotonic()))

    async def main() -> None:
        await asyncio.gather(step("big", 2), *(step("small", 1) for _ in range(3)))

    asyncio.run(main())
    big = [(s, e) for kind, s, e in intervals if kind == "big"]
    small = [(s, e) for kind, s, e in intervals if kind == "small"]
    assert len(big) == 1
    assert len(small) == 3
    ((b_start, b_end),) = big
    for s_start, s_end in small:
        assert s_end <= b_start or s_start >= b_end, "a step ran beside the occupy=2 step"
