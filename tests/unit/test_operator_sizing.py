"""The limit's size from the GPUs a pod really has (``pgw_operator.sizing``)."""

from __future__ import annotations

from pgw_operator.sizing import LimitSize, SizingProblem, size_limit

from builders import NODES, make_spec, pod


def test_container_limit_sizes_the_limit_times_slots_per_gpu() -> None:
    sized = size_limit(pod("w", gpus=2), NODES["gpu-8"], make_spec(perWorker=2, slotsPerGpu=2))
    assert sized == LimitSize(4, "2", "container limit nvidia.com/gpu=2")


def test_whole_node_uses_node_allocatable() -> None:
    spec = make_spec(wholeNode=True)
    sized = size_limit(pod("w", gpus=None), NODES["gpu-8"], spec)
    assert isinstance(sized, LimitSize)
    assert (sized.size, sized.gpus) == (8, "8")


def test_time_sliced_node_counts_physical_gpus() -> None:
    whole = size_limit(
        pod("w", "timesliced", gpus=None), NODES["timesliced"], make_spec(wholeNode=True)
    )
    assert isinstance(whole, LimitSize)
    assert (whole.size, whole.gpus) == (2, "2")
    assert "time-sliced x4" in whole.basis
    one_replica = size_limit(pod("w", "timesliced", gpus=1), NODES["timesliced"], make_spec())
    assert isinstance(one_replica, LimitSize)
    # A quarter of a GPU still gets one slot, never a whole GPU's worth of many.
    assert (one_replica.size, one_replica.gpus) == (1, "0.25")
    shared = make_spec(perWorker=2, slotsPerGpu=4)
    two_replicas = size_limit(pod("w", "timesliced", gpus=2), NODES["timesliced"], shared)
    assert isinstance(two_replicas, LimitSize)
    assert (two_replicas.size, two_replicas.gpus) == (2, "0.5")


def test_mig_slices_are_devices_not_gpus() -> None:
    spec = make_spec(resourceName="nvidia.com/mig-1g.10gb", wholeNode=True, slotsPerGpu=1)
    sized = size_limit(pod("w", "mig", gpus=None), NODES["mig"], spec)
    assert isinstance(sized, LimitSize)
    assert (sized.size, sized.gpus) == (7, "7 mig-1g.10gb")


def test_no_gpu_is_a_problem_not_a_zero_limit() -> None:
    assert isinstance(size_limit(pod("w", gpus=None), NODES["gpu-8"], make_spec()), SizingProblem)
    problem = size_limit(pod("w", "cpu", gpus=None), NODES["cpu"], make_spec(wholeNode=True))
    assert isinstance(problem, SizingProblem)
    assert "no GPU" in problem.reason
