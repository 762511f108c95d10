"""spec.gpu.memoryPerSlot: slots per GPU from the node's GPU feature discovery memory label."""

from __future__ import annotations

from typing import Any

import pytest

from pgw_operator.conditions import PoolHealth, pool_conditions
from pgw_operator.facts import PodFacts
from pgw_operator.plan import plan_limits
from pgw_operator.sizing import LimitSize, SizingProblem, parse_memory_quantity, size_limit
from pgw_operator.spec import PoolSpec

from builders import GFD_NODES

A100_80, H100_80, SLICED, MIG, NO_GFD = (
    GFD_NODES[name] for name in ("a100", "h100", "sliced", "mig-2g", "bare")
)


def spec(**gpu: Any) -> PoolSpec:
    return PoolSpec.from_dict(
        {
            "workPool": {"name": "p"},
            "prefect": {"apiUrl": "http://prefect:4200/api"},
            "gpu": gpu,
            "worker": {"image": "example/worker:1"},
        }
    )


def pod(node: str, gpus: int, resource: str = "nvidia.com/gpu") -> PodFacts:
    return PodFacts("w-0", node, "Running", False, True, 0, {resource: str(gpus)})


def test_memory_per_slot_is_read_from_the_spec() -> None:
    assert spec(perWorker=1, memoryPerSlot="20Gi").memory_per_slot == "20Gi"
    assert spec(perWorker=1).memory_per_slot is None


@pytest.mark.parametrize(
    ("text", "size"), [("20Gi", 20 * 2**30), ("24G", 24 * 10**9), ("512Mi", 512 * 2**20)]
)
def test_kubernetes_memory_quantities(text: str, size: int) -> None:
    assert parse_memory_quantity(text) == size


def test_slots_are_floor_of_gpu_memory_over_memory_per_slot() -> None:
    sized = size_limit(pod("a100", 2), A100_80, spec(perWorker=2, memoryPerSlot="20Gi"))
    assert isinstance(sized, LimitSize)
    assert (sized.size, sized.gpus) == (8, "2")  # 2 GPUs x floor(80 GiB / 20 GiB)
    assert "nvidia.com/gpu.memory=81920 MiB / memoryPerSlot 20Gi = 4 slot(s) per GPU" in sized.basis
    # An "80GB" H100 has 79.6 GiB: 3 slots of 20 GiB, not 4.
    h100 = size_limit(pod("h100", 1), H100_80, spec(perWorker=1, memoryPerSlot="20Gi"))
    assert isinstance(h100, LimitSize)
    assert h100.size == 3


def test_a_step_bigger_than_the_gpu_still_gets_one_slot() -> None:
    sized = size_limit(pod("a100", 1), A100_80, spec(perWorker=1, memoryPerSlot="100Gi"))
    assert isinstance(sized, LimitSize)
    assert sized.size == 1


def test_time_sliced_and_mig_devices_use_their_own_memory() -> None:
    # 4 replicas of an 80 GiB GPU: 2 replicas are half a GPU, 4 slots x 0.5 = 2.
    sliced = size_limit(pod("sliced", 2), SLICED, spec(perWorker=2, memoryPerSlot="20Gi"))
    assert isinstance(sliced, LimitSize)
    assert sliced.size == 2
    mig_spec = spec(perWorker=2, memoryPerSlot="10Gi", resourceName="nvidia.com/mig-2g.20gb")
    mig = size_limit(pod("mig-2g", 2, "nvidia.com/mig-2g.20gb"), MIG, mig_spec)
    assert isinstance(mig, LimitSize)
    assert mig.size == 2  # floor(19.5 GiB / 10 GiB) = 1 per slice, 2 slices


def test_missing_memory_label_is_a_degraded_sizing_problem_naming_the_label() -> None:
    pool = spec(perWorker=1, memoryPerSlot="20Gi")
    problem = size_limit(pod("bare", 1), NO_GFD, pool)
    assert isinstance(problem, SizingProblem)
    assert "node bare has no label nvidia.com/gpu.memory" in problem.reason
    plan = plan_limits(pool, {}, {"w-0": pod("bare", 1)}, {"bare": NO_GFD}, {})
    assert plan.actions == []  # no guessed limit
    conditions, phase = pool_conditions(PoolHealth(1, 1, 0, 0, tuple(plan.problems)))
    degraded = next(c for c in conditions if c.type == "Degraded")
    assert (phase, degraded.status, degraded.reason) == ("Degraded", True, "LimitSizing")
    assert "nvidia.com/gpu.memory" in degraded.message


def test_slots_per_gpu_still_sizes_without_memory_per_slot() -> None:
    sized = size_limit(pod("bare", 2), NO_GFD, spec(perWorker=2, slotsPerGpu=3))
    assert isinstance(sized, LimitSize)
    assert sized.size == 6
