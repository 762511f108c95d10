"""Local mode's pure decisions and its process bookkeeping (no Prefect server needed)."""

from __future__ import annotations

from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun, State, StateType

from prefect_gpu_workers.gpu import GpuDevice, GpuInventory
from prefect_gpu_workers.local.plan import (
    count_runs,
    flow_runs_per_worker,
    flow_runs_to_fill,
    plan_capacity,
    plan_workers,
    worker_ids,
)
from prefect_gpu_workers.naming import WorkerIdentityError

NO_DRIVER = GpuInventory(unavailable_reason="NVML could not start: Driver Not Loaded")
TWO_GPUS = GpuInventory(devices=(GpuDevice(0, "L4", 23034), GpuDevice(1, "L4", 23034)))


def test_no_gpu_and_nothing_stated_falls_back_and_says_so() -> None:
    plan = plan_capacity(NO_DRIVER)
    assert (plan.capacity.gpus, plan.capacity.slots_per_gpu, plan.capacity.slots) == (1, 2, 2)
    (message,) = plan.messages
    assert "no NVIDIA GPU found" in message
    assert "Driver Not Loaded" in message
    assert "--gpus" in message


def test_stated_capacity_overrides_detection() -> None:
    plan = plan_capacity(NO_DRIVER, stated_gpus=2, slots_per_gpu=3)
    assert plan.capacity.slots == 6
    assert plan.capacity.source == "stated"
    assert any("stated 2 GPU(s)" in m for m in plan.messages)


def test_detected_gpus_size_the_limit() -> None:
    plan = plan_capacity(TWO_GPUS, slots_per_gpu=1)
    assert (plan.capacity.slots, plan.capacity.source) == (2, "detected")
    assert "2 NVIDIA GPU(s)" in " ".join(plan.messages)


def test_worker_ids_are_valid_and_distinct() -> None:
    assert worker_ids(3) == ["local-1", "local-2", "local-3"]
    with pytest.raises(ValueError, match="at least one"):
        worker_ids(0)
    with pytest.raises(WorkerIdentityError):
        worker_ids(1, prefix="Bad_Prefix")


def test_plans_name_one_limit_per_worker() -> None:
    plans = plan_workers(["local-1", "local-2"], slots=2, flow_runs=7, limit_prefix="gpu")
    assert [p.limit_name for p in plans] == ["gpu:local-1", "gpu:local-2"]
    assert {(p.slots, p.flow_runs) for p in plans} == {(2, 7)}
    with pytest.raises(ValueError, match="flow runs per worker must be at least 1"):
        plan_workers(["local-1"], slots=2, flow_runs=0)


@pytest.mark.parametrize(
    ("slots", "download", "gpu", "save", "expected"),
    [
        (2, 3.0, 3.0, 3.0, 8),  # 3 runs per slot to keep it busy, one spare each
        (1, 2.0, 3.0, 2.0, 4),  # ceil(7 / 3) = 3, + 1
        (2, 0.0, 5.0, 0.0, 4),  # GPU-only runs: 1 per slot, + 1
        (2, 1.0, 0.0, 1.0, 6),  # no GPU time stated: 3 per slot
    ],
)
def test_flow_runs_to_fill(
    slots: int, download: float, gpu: float, save: float, expected: int
) -> None:
    assert flow_runs_to_fill(slots, download, gpu, save) == expected


def _run(state: StateType | None) -> FlowRun:
    return FlowRun(flow_id=uuid4(), state=State(type=state) if state else None)


def test_count_runs_groups_states() -> None:
    runs = [
        _run(None),
        _run(StateType.SCHEDULED),
        _run(StateType.PENDING),
        _run(StateType.RUNNING),
        _run(StateType.CANCELLING),
        _run(StateType.COMPLETED),
        _run(StateType.FAILED),
        _run(StateType.CRASHED),
        _run(StateType.CANCELLED),
    ]
    counts = count_runs(runs)
    assert (counts.waiting, counts.running, counts.completed, counts.failed) == (3, 2, 1, 3)
    assert not counts.done
    assert count_runs([_run(StateType.COMPLETED), _run(StateType.FAILED)]).done


@pytest.mark.parametrize(
    ("runs", "workers", "expected"),
    [
        (12, 2, 6),  # the batch's share, below the 8 that would fill 2 slots
        (40, 2, 8),  # enough to fill the slots, no more
        (2, 2, 2),  # never below the slots
    ],
)
def test_flow_runs_per_worker_spreads_a_batch(runs: int, workers: int, expected: int) -> None:
    assert flow_runs_per_worker(2, runs, workers, 3.0, 3.0, 3.0) == expected
