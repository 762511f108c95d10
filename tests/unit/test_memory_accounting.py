"""GPU memory placement's pure parts: the request's wire form, the step's request,
where the worker's GPUs come from, the memory mix, and the accounting of a batch."""

from __future__ import annotations

import pytest

from prefect_gpu_workers.gpu import GpuDevice, GpuInventory, MigDevice, cuda_devices
from prefect_gpu_workers.local.demo import placing_by_memory
from prefect_gpu_workers.local.plan import MemoryMix, plan_workers
from prefect_gpu_workers.local.timeline import TimelinePhase, layout_phase
from prefect_gpu_workers.naming import gib_capacity, gib_held, memory_limit_name, parse_memory_mib
from prefect_gpu_workers.records import StageRecord
from prefect_gpu_workers.report import memory_use
from prefect_gpu_workers.slots.client import GpuGrant, GpuSlotRequest
from prefect_gpu_workers.slots.wire import parse_acquire


def step(run: str, start: float, end: float, gib: int | None, on: str | None = "cuda:0",
         worker: str = "w", peak: float | None = None) -> StageRecord:  # fmt: skip
    return StageRecord(
        run, worker, "gpu", start, start, end, 1, f"gpu:{worker}", "simulated",
        peak_memory_mib=peak, memory_gib=gib, placed_on=on if gib is not None else None,
    )  # fmt: skip


def test_memory_sizes_and_their_whole_gib() -> None:
    assert parse_memory_mib("40Gi") == parse_memory_mib("40GiB") == parse_memory_mib(40) == 40960
    assert gib_held(parse_memory_mib("7.5GiB")) == 8  # a request rounds up
    assert gib_capacity(81559) == 79  # an H100's 81559 MiB holds 79 whole GiB
    assert memory_limit_name("box", "infer") == "infer-memory:box"
    for bad in ("lots", "-1GiB", "0", "80KiB"):
        with pytest.raises(ValueError, match="memory size"):
            parse_memory_mib(bad)


def test_the_acquire_message_checks_memory_and_also_field_by_field() -> None:
    request = parse_acquire({"limit": "gpu:w", "memory_gib": 20, "also": {"lic-b": 1, "lic-a": 2}})
    assert (request.memory_gib, request.also) == (20, (("lic-a", 2), ("lic-b", 1)))
    for message, field in (
        ({"limit": "gpu:w", "memory_gib": 1.5}, "memory_gib"),
        ({"limit": "gpu:w", "memory_gib": True}, "memory_gib"),
        ({"limit": "gpu:w", "also": {"x": 0}}, r"also\[x\]"),
        ({"limit": "gpu:w", "also": {"gpu:w": 1}}, "also names"),
        ({"limit": "gpu:w", "also": ["x"]}, "also must be"),
        ({"limit": "gpu:w", "also": {str(i): 1 for i in range(9)}}, "at most 8"),
    ):
        with pytest.raises(ValueError, match=field):
            parse_acquire(message)


def test_a_step_s_request_names_each_limit_it_holds_in_the_order_taken() -> None:
    request = GpuSlotRequest.for_worker(
        2, worker_id="w", memory="20.5GiB", also={"lic-b": 1, "lic-a": 1}
    )
    # The broker's order, which the fallback through Prefect follows too.
    assert request.limits == [
        ("gpu-memory:w", 21), ("lic-a", 1), ("lic-b", 1), ("gpu:w", 2),
    ]  # fmt: skip
    assert GpuSlotRequest.for_worker(worker_id="w").limits == [("gpu:w", 1)]
    with pytest.raises(ValueError, match="another limit"):
        GpuSlotRequest.for_worker(worker_id="w", memory="8GiB", also={"gpu-memory:w": 1})


def test_a_grant_reads_as_the_limit_name_it_always_was() -> None:
    placed = GpuGrant("gpu:w", position=1, gpu_uuid="GPU-b", memory_gib=20)
    assert placed == "gpu:w"
    assert (placed.device, placed.position, placed.memory_gib) == ("cuda:1", 1, 20)
    assert GpuGrant("gpu:w").device == "cuda"  # not placed: the current device


def test_cuda_devices_follow_cuda_visible_devices_and_count_mig_instances() -> None:
    mig = GpuDevice(1, "A100", 81920, "GPU-b", (MigDevice(0, "MIG-x", 9728),))
    inventory = GpuInventory((GpuDevice(0, "H100", 81559, "GPU-a"), mig))
    assert [(d.uuid, d.memory_mib) for d in cuda_devices(inventory, None)] == [
        ("GPU-a", 81559), ("MIG-x", 9728),
    ]  # fmt: skip
    assert [d.uuid for d in cuda_devices(inventory, "MIG-x,0")] == ["MIG-x", "GPU-a"]
    # An entry NVML does not know keeps its place, memory unknown.
    assert cuda_devices(inventory, "GPU-zz")[0].memory_mib is None


def test_the_memory_mix_repeats_its_proportions() -> None:
    mix = MemoryMix.parse("8GiB:3, 40GiB")
    assert [mix.for_run(i) for i in range(8)] == ["8GiB"] * 3 + ["40GiB"] + ["8GiB"] * 3 + ["40GiB"]
    assert (mix.smallest_gib, mix.largest_gib, mix.mean_gib) == (8, 40, 16.0)
    for bad in ("", "8GiB:0", "lots:1"):
        with pytest.raises(ValueError, match=r"memory|share|names no size"):
            MemoryMix.parse(bad)


def test_local_workers_placing_by_memory_get_slots_enough_for_the_smallest_step() -> None:
    plans = plan_workers(["w-1"], slots=4, flow_runs=8)
    placed, line = placing_by_memory(plans, MemoryMix.parse("8GiB:3,40GiB:1"), 2, "80GiB",
                                     GpuInventory())  # fmt: skip
    (plan,) = placed
    assert (plan.gpus, plan.gpu_memory_gib, plan.slots) == (2, 80, 20)
    assert (plan.memory_limit_name, plan.memory_limit_gib) == ("gpu-memory:w-1", 160)
    assert "2 GPU(s) of 80 GiB per worker (stated)" in line
    nvml = GpuInventory((GpuDevice(0, "H100", 81559, "GPU-a"),))
    assert (
        placing_by_memory(plans, MemoryMix.parse("8GiB"), 1, None, nvml)[0][0].gpu_memory_gib == 79
    )
    with pytest.raises(ValueError, match="asks for 100 GiB, more than a GPU's 80 GiB"):
        placing_by_memory(plans, MemoryMix.parse("100GiB"), 1, "80GiB", GpuInventory())


def test_memory_use_counts_declared_gib_seconds_and_any_gpu_or_limit_passed() -> None:
    steps = [
        step("a", 0, 10, 40, "cuda:0"),
        step("b", 0, 10, 40, "cuda:0"),
        step("c", 0, 5, 80, "cuda:1"),
        step("d", 5, 10, 8, "cuda:1", peak=9000.0),  # 8 GiB declared, 8.8 GiB used
    ]
    use = memory_use(steps, gpu_gib=80, worker_gib={"w": 160})
    assert use.declared_gib_s == 40 * 10 * 2 + 80 * 5 + 8 * 5
    assert (use.capacity_gib, use.span_s) == (160, 10)
    assert use.utilisation == pytest.approx(1240 / 1600)
    assert (use.over_gpu, use.over_memory_limit, use.over_declared) == (0, 0, 1)
    crowded = memory_use([*steps, step("e", 1, 2, 8, "cuda:0")], 80, {"w": 160})
    assert (crowded.over_gpu, crowded.over_memory_limit) == (1, 1)
    # Steps that were not placed count what their run declared.
    fixed = memory_use([step("a", 0, 4, None)], 80, {"w": 160}, declared={"a": 40})
    assert fixed.declared_gib_s == 160


def test_the_timeline_draws_each_placed_gpu_s_declared_memory() -> None:
    steps = [step("a", 1, 3, 40, "cuda:0"), step("b", 2, 4, 8, "cuda:0"),
             step("c", 1, 2, 40, "cuda:1")]  # fmt: skip
    layout = layout_phase(TimelinePhase("p", steps, {"w": 4}, started_at=0.0, gpu_memory_gib=80))
    assert layout.gpu_memory_gib == 80
    # Steps from time zero, held until the phase's end (the last point repeats it).
    assert layout.declared_memory["w cuda:0"] == [(0.0, 0), (1.0, 40), (2.0, 48), (3.0, 8),
                                                  (4.0, 0), (4.0, 0)]  # fmt: skip
    assert layout.declared_memory["w cuda:1"][1:3] == [(1.0, 40), (2.0, 0)]
