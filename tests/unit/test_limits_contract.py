"""Pure parts of the limit contract: identity, names, capacity."""

from __future__ import annotations

import pytest

from prefect_gpu_workers.gpu import GpuDevice, GpuInventory, resolve_capacity
from prefect_gpu_workers.naming import (
    WorkerIdentityError,
    limit_name,
    parse_limit_name,
    worker_id_from_env,
)
from prefect_gpu_workers.slots.client import GpuSlotRequest


def test_worker_id_comes_from_env() -> None:
    assert worker_id_from_env({"WORKER_ID": "gpu-pool-7d9f-abcde"}) == "gpu-pool-7d9f-abcde"


def test_missing_worker_id_is_an_error_not_a_default() -> None:
    with pytest.raises(WorkerIdentityError, match="WORKER_ID is not set"):
        worker_id_from_env({})


@pytest.mark.parametrize("bad", ["", "GPU-1", "gpu/1", "a%b", "x>y", "-lead", "trail-", "a" * 254])
def test_invalid_worker_id_is_rejected(bad: str) -> None:
    with pytest.raises(WorkerIdentityError):
        worker_id_from_env({"WORKER_ID": bad})


def test_limit_name_follows_prefix_colon_worker() -> None:
    assert limit_name("pool-abc-123") == "gpu:pool-abc-123"
    assert limit_name("w1", limit_prefix="license") == "license:w1"
    assert parse_limit_name("gpu:pool-abc-123") == ("gpu", "pool-abc-123")
    assert parse_limit_name("no-colon") is None
    assert parse_limit_name("gpu:Bad") is None


@pytest.mark.parametrize("bad", ["GPU", "g/pu", "a:b", ""])
def test_invalid_limit_prefix_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="limit prefix"):
        limit_name("w1", limit_prefix=bad)


def test_occupy_must_be_positive() -> None:
    with pytest.raises(ValueError, match="occupy"):
        GpuSlotRequest.for_worker(0, worker_id="w1")


def test_no_driver_reports_zero_gpus_with_reason() -> None:
    from prefect_gpu_workers.gpu import detect_gpus

    inventory = detect_gpus()
    # This machine (and CI) has no NVIDIA driver: the documented fallback.
    if inventory.count == 0:
        assert inventory.unavailable_reason
        assert "no NVIDIA GPU found" in inventory.describe()
        with pytest.raises(ValueError, match="state the capacity explicitly"):
            resolve_capacity(inventory)
    else:  # pragma: no cover - only on a GPU machine
        assert inventory.unavailable_reason is None


def test_stated_capacity_wins_and_says_so() -> None:
    none_found = GpuInventory(unavailable_reason="NVML could not start: Driver Not Loaded")
    capacity = resolve_capacity(none_found, stated_gpus=2, slots_per_gpu=2)
    assert (capacity.slots, capacity.source) == (4, "stated")
    assert "Driver Not Loaded" in capacity.notes[0]

    two = GpuInventory(devices=(GpuDevice(0, "A100", 40960), GpuDevice(1, "A100", 40960)))
    detected = resolve_capacity(two, slots_per_gpu=3)
    assert (detected.gpus, detected.slots, detected.source) == (2, 6, "detected")
    overridden = resolve_capacity(two, stated_gpus=1)
    assert overridden.slots == 1
    assert "overrides" in overridden.notes[0]


@pytest.mark.parametrize(("gpus", "per_gpu"), [(0, 1), (1, 0)])
def test_capacity_never_zero(gpus: int, per_gpu: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        resolve_capacity(GpuInventory(), stated_gpus=gpus, slots_per_gpu=per_gpu)
