"""Pure planning of GPU memory in `start`: stated or NVML memory, each worker's
memory limit (whole GiB, each device rounded down) and its command line (issue 24)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from prefect_gpu_workers.gpu import GpuDevice, GpuInventory, MigDevice
from prefect_gpu_workers.service.plan import (
    MemoryPerSlot,
    PlannedLimit,
    ServiceWorker,
    SlotsPerGpu,
    WorkerMemory,
    devices_from,
    plan_service,
)
from prefect_gpu_workers.service.run import Refused, StartOptions, build_plan, worker_argv

GIB = 2**30
NO_GPU = GpuInventory(unavailable_reason="no driver")
A100 = GpuDevice(0, "NVIDIA A100-SXM4-80GB", 81920, uuid="GPU-aaaa")
H100 = GpuDevice(1, "NVIDIA H100 80GB HBM3", 81559, uuid="GPU-bbbb")
MIG_GPU = GpuDevice(
    2,
    "NVIDIA A100-SXM4-40GB",
    40960,
    uuid="GPU-cccc",
    mig_devices=(MigDevice(0, "MIG-1111", 19968), MigDevice(1, "MIG-2222", 9856)),
)


def _limits(workers: Sequence[ServiceWorker]) -> list[list[tuple[str, int, str]]]:
    return [[(limit.name, limit.size, limit.unit) for limit in w.limits] for w in workers]


def test_stated_memory_sizes_one_workers_memory_limit_over_all_gpus() -> None:
    devices = devices_from(NO_GPU, 2, 40 * 1024)
    assert [(d.description, d.memory_mib) for d in devices] == [
        ("GPU 0 (stated, 40 GiB)", 40960),
        ("GPU 1 (stated, 40 GiB)", 40960),
    ]
    plan = plan_service("box", devices, SlotsPerGpu(1))
    (worker,) = plan.workers
    assert worker.memory == WorkerMemory(80, 2, "40GiB")
    assert worker.limits == (
        PlannedLimit("gpu:box", 2, "slot(s)"),
        PlannedLimit("gpu-memory:box", 80, "GiB"),
    )
    assert plan.messages[-1] == (
        "worker box: limit(s) gpu:box = 2 slot(s), gpu-memory:box = 80 GiB, "
        "6 flow run(s) at once, GPU memory placed on 2 x 40GiB"
    )
    assert not any("GPU memory unknown" in line for line in plan.messages)


def test_per_gpu_workers_each_get_their_own_devices_memory() -> None:
    plan = plan_service(
        "box", devices_from(NO_GPU, 2, 40 * 1024), SlotsPerGpu(1), per_gpu=True, limit_prefix="v"
    )
    assert _limits(plan.workers) == [
        [("v:box-gpu0", 1, "slot(s)"), ("v-memory:box-gpu0", 40, "GiB")],
        [("v:box-gpu1", 1, "slot(s)"), ("v-memory:box-gpu1", 40, "GiB")],
    ]
    assert {w.memory for w in plan.workers} == {WorkerMemory(40, 1, "40GiB")}


def test_nvml_memory_rounds_each_device_down_and_mig_instances_count_alone() -> None:
    devices = devices_from(GpuInventory(devices=(A100, H100, MIG_GPU)), None)
    (one,) = plan_service("box", devices, SlotsPerGpu(1)).workers
    # 80 + 79 (79.6 rounded down on its own) + 19 (19.5) + 9 (9.6): not floor(188.7).
    assert one.limits[1] == PlannedLimit("gpu-memory:box", 80 + 79 + 19 + 9, "GiB")
    # The devices differ: the worker reads each GPU's memory from NVML itself.
    assert one.memory == WorkerMemory(187, None, None)
    per_gpu = plan_service("box", devices, SlotsPerGpu(1), per_gpu=True).workers
    assert [(w.name, w.memory) for w in per_gpu] == [
        ("box-gpu0", WorkerMemory(80, 1, "80GiB")),
        ("box-gpu1", WorkerMemory(79, 1, "81559MiB")),
        ("box-gpu2-mig0", WorkerMemory(19, 1, "19968MiB")),
        ("box-gpu2-mig1", WorkerMemory(9, 1, "9856MiB")),
    ]


def test_same_nvml_gpus_state_their_count_and_memory() -> None:
    twins = (A100, GpuDevice(1, A100.name, 81920, uuid="GPU-dddd"))
    (worker,) = plan_service(
        "box", devices_from(GpuInventory(devices=twins), None), SlotsPerGpu(1)
    ).workers
    assert worker.memory == WorkerMemory(160, 2, "80GiB")


def test_without_known_memory_no_memory_limit_and_the_plan_says_so_once() -> None:
    plan = plan_service("box", devices_from(NO_GPU, 2), SlotsPerGpu(1), per_gpu=True)
    assert _limits(plan.workers) == [
        [("gpu:box-gpu0", 1, "slot(s)")],
        [("gpu:box-gpu1", 1, "slot(s)")],
    ]
    assert [w.memory for w in plan.workers] == [None, None]
    unknown = [line for line in plan.messages if "GPU memory unknown" in line]
    assert unknown == [
        "GPU memory unknown (NVML finds no GPU and no --gpu-memory is stated): no memory limit "
        "gpu-memory:<worker>; GPU steps are limited by slots alone"
    ]
    assert "gpu-memory:box-gpu0" not in "\n".join(plan.messages)


def test_stated_memory_contradicting_nvml_is_refused_equal_in_whole_gib_is_not() -> None:
    h100 = GpuInventory(devices=(H100,))
    # 81559 MiB is 79 GiB whole: 79GiB states the same limit, 80GiB does not.
    assert devices_from(h100, None, 79 * 1024)[0].memory_mib == 81559
    with pytest.raises(ValueError, match=r"--gpu-memory 80GiB \(80 GiB\) contradicts NVML") as err:
        devices_from(h100, None, 80 * 1024)
    assert "GPU 1 (NVIDIA H100 80GB HBM3, 81559 MiB) = 79 GiB" in str(err.value)
    # MIG instances are the devices checked.
    with pytest.raises(ValueError, match="GPU 2 MIG 1"):
        devices_from(GpuInventory(devices=(MIG_GPU,)), None, 19968)
    with pytest.raises(ValueError, match="under 1 GiB"):
        devices_from(NO_GPU, 1, 512)


def test_stated_memory_sizes_slots_with_memory_per_slot() -> None:
    plan = plan_service("box", devices_from(NO_GPU, 1, 40 * 1024), MemoryPerSlot(20 * GIB))
    assert plan.workers[0].slots == 2
    with pytest.raises(ValueError, match="state --gpu-memory too"):
        plan_service("box", devices_from(NO_GPU, 1), MemoryPerSlot(20 * GIB))


def test_the_workers_command_states_its_gpus_and_memory_only_when_known() -> None:
    stated, _ = build_plan(
        StartOptions("p", worker_id="box", gpus=2, gpu_memory_mib=40960), NO_GPU, {}, "h"
    )
    assert worker_argv(stated.workers[0], "p", 45)[-4:] == ["--gpus", "2", "--gpu-memory", "40GiB"]
    per_gpu, _ = build_plan(
        StartOptions("p", worker_id="box", gpus=2, gpu_memory_mib=40960, per_gpu=True),
        NO_GPU,
        {},
        "h",
    )
    assert {tuple(worker_argv(w, "p", 45)[-4:]) for w in per_gpu.workers} == {
        ("--gpus", "1", "--gpu-memory", "40GiB")
    }
    unknown, _ = build_plan(StartOptions("p", worker_id="box", gpus=2), NO_GPU, {}, "h")
    assert "--gpu-memory" not in worker_argv(unknown.workers[0], "p", 45)
    differ, _ = build_plan(
        StartOptions("p", worker_id="box"), GpuInventory(devices=(A100, H100)), {}, "h"
    )
    argv = worker_argv(differ.workers[0], "p", 45)
    assert not {"--gpus", "--gpu-memory"} & set(argv)
    with pytest.raises(Refused, match="contradicts NVML"):
        build_plan(StartOptions("p", gpu_memory_mib=40960), GpuInventory(devices=(A100,)), {}, "h")


def test_start_parses_gpu_memory_in_mib_a_bare_number_is_gib(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from prefect_gpu_workers.cli import build_parser

    def parsed(*args: str) -> int | None:
        value: int | None = build_parser().parse_args(["start", "--pool", "p", *args]).gpu_memory
        return value

    assert parsed("--gpu-memory", "40GiB") == parsed("--gpu-memory", "40") == 40960
    assert parsed("--gpu-memory", "80GB") == 76293
    assert parsed() is None
    with pytest.raises(SystemExit):
        parsed("--gpu-memory", "lots")
    assert "memory size 'lots' is not a number with a unit" in capsys.readouterr().err
