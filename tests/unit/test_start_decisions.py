"""Pure decisions of `start`: identity, devices, sizing, GPU memory, liveness, restarts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from prefect_gpu_workers.gpu import GpuDevice, GpuInventory, MigDevice
from prefect_gpu_workers.naming import WorkerIdentityError, validate_worker_id
from prefect_gpu_workers.service.identity import resolve_worker_id, worker_id_from_host_name
from prefect_gpu_workers.service.plan import (
    MemoryPerSlot,
    PlannedLimit,
    RestartPolicy,
    ServiceWorker,
    SlotsPerGpu,
    WorkerMemory,
    WorkerSighting,
    devices_from,
    judge_liveness,
    plan_service,
    watch_seconds,
)
from prefect_gpu_workers.service.run import (
    Refused,
    StartOptions,
    build_plan,
    metrics_socket_of,
    worker_argv,
)
from prefect_gpu_workers.service.sizing import parse_memory_size, slots_for_memory

GIB = 2**30
A100 = GpuDevice(0, "NVIDIA A100-SXM4-80GB", 81920, uuid="GPU-aaaa")
H100 = GpuDevice(1, "NVIDIA H100 80GB HBM3", 81559, uuid="GPU-bbbb")
MIG_GPU = GpuDevice(
    2,
    "NVIDIA A100-SXM4-40GB",
    40960,
    uuid="GPU-cccc",
    mig_devices=(MigDevice(0, "MIG-1111", 19968), MigDevice(1, "MIG-2222", 9856)),
)


# ---------------------------------------------------------------- identity


def test_worker_id_prefers_flag_then_env_then_host_name() -> None:
    env = {"WORKER_ID": "from-env"}
    assert resolve_worker_id("from-flag", env, "host").worker_id == "from-flag"
    assert resolve_worker_id(None, env, "host").source == "WORKER_ID"
    choice = resolve_worker_id(None, {}, "gpu-box-1")
    assert (choice.worker_id, choice.source) == ("gpu-box-1", "host name")
    assert "set --worker-id or WORKER_ID" in choice.message


def test_a_typed_id_is_validated_not_rewritten() -> None:
    with pytest.raises(WorkerIdentityError, match="--worker-id"):
        resolve_worker_id("GPU_Box", {}, "host")
    with pytest.raises(WorkerIdentityError, match="WORKER_ID"):
        resolve_worker_id(None, {"WORKER_ID": "a b"}, "host")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("GPU_Box_1", "gpu-box-1"),
        ("-Lab..Node-7-.example.COM", "lab.node-7.example.com"),
        ("box #3", "box--3"),
    ],
)
def test_host_name_becomes_a_valid_id_and_says_so(host: str, expected: str) -> None:
    assert worker_id_from_host_name(host) == expected
    choice = resolve_worker_id(None, {}, host)
    assert choice.worker_id == expected
    assert f"made a valid DNS subdomain from {host!r}" in choice.message


def test_long_host_name_is_trimmed_with_room_for_per_gpu_suffix() -> None:
    worker_id = worker_id_from_host_name("a" * 300 + ".x", room=16)
    assert len(worker_id) <= 253 - 16
    validate_worker_id(worker_id + "-gpu12-mig6")
    with pytest.raises(WorkerIdentityError, match="no valid worker id"):
        worker_id_from_host_name("__!!__")


# ---------------------------------------------------------------- sizing


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("20GiB", 20 * GIB),
        ("20Gi", 20 * GIB),
        ("20 gib", 20 * GIB),
        ("24GB", 24 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5TiB", int(1.5 * 2**40)),
        ("4096", 4096),
    ],
)
def test_memory_sizes_parse(text: str, size: int) -> None:
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["", "20 GiBs", "-1GiB", "0GiB", "twenty GiB", "20XB"])
def test_bad_memory_sizes_are_refused_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match="memory size"):
        parse_memory_size(text)


def test_slots_are_floor_of_memory_over_memory_per_slot_at_least_one() -> None:
    assert slots_for_memory(81920, 20 * GIB).slots == 4
    # An "80GB" H100 has 79.6 GiB: three 20 GiB steps fit, not four.
    h100 = slots_for_memory(81559, 20 * GIB, "GPU 1")
    assert h100.slots == 3
    assert h100.message == "GPU 1: 79.6 GiB / 20 GiB per slot = 3 slot(s)"
    small = slots_for_memory(9856, 20 * GIB)
    assert small.slots == 1
    assert "less than one slot; using 1 slot" in small.message


# ---------------------------------------------------------------- devices and plan


def test_mig_instances_count_as_devices_addressed_by_uuid() -> None:
    devices = devices_from(GpuInventory(devices=(A100, MIG_GPU)), None)
    assert [(d.label, d.visible_id, d.memory_mib) for d in devices] == [
        ("gpu0", "GPU-aaaa", 81920),
        ("gpu2-mig0", "MIG-1111", 19968),
        ("gpu2-mig1", "MIG-2222", 9856),
    ]


def test_stated_gpus_apply_only_when_nvml_finds_none() -> None:
    stated = devices_from(GpuInventory(unavailable_reason="no driver"), 2)
    assert [(d.label, d.visible_id, d.memory_mib) for d in stated] == [
        ("gpu0", "0", None),
        ("gpu1", "1", None),
    ]
    with pytest.raises(ValueError, match="contradicts NVML"):
        devices_from(GpuInventory(devices=(A100,)), 2)
    with pytest.raises(ValueError, match="--gpus N"):
        devices_from(GpuInventory(unavailable_reason="no driver"), None)


def test_per_gpu_plan_pins_one_device_per_worker_with_its_own_limit() -> None:
    devices = devices_from(GpuInventory(devices=(A100, H100, MIG_GPU)), None)
    plan = plan_service("box", devices, MemoryPerSlot(20 * GIB), per_gpu=True)
    assert [(w.name, w.limit_name, w.slots, w.visible_devices) for w in plan.workers] == [
        ("box-gpu0", "gpu:box-gpu0", 4, "GPU-aaaa"),
        ("box-gpu1", "gpu:box-gpu1", 3, "GPU-bbbb"),
        ("box-gpu2-mig0", "gpu:box-gpu2-mig0", 1, "MIG-1111"),
        ("box-gpu2-mig1", "gpu:box-gpu2-mig1", 1, "MIG-2222"),
    ]
    env = plan.workers[1].env()
    assert env["WORKER_ID"] == "box-gpu1"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb"
    assert env["PGW_LIMIT_PREFIX"] == "gpu"
    assert any("79.6 GiB / 20 GiB per slot = 3 slot(s)" in m for m in plan.messages)


def test_one_worker_plan_sums_slots_and_inherits_devices() -> None:
    devices = devices_from(GpuInventory(unavailable_reason="no driver"), 2)
    plan = plan_service("box", devices, SlotsPerGpu(2), limit_prefix="vram")
    (worker,) = plan.workers
    assert (worker.name, worker.limit_name, worker.slots, worker.flow_runs) == (
        "box",
        "vram:box",
        4,
        12,
    )
    assert worker.visible_devices is None
    assert "CUDA_VISIBLE_DEVICES" not in worker.env()
    assert plan_service("box", devices, SlotsPerGpu(2), flow_runs=5).workers[0].flow_runs == 5


def test_memory_sizing_needs_nvml_memory() -> None:
    devices = devices_from(GpuInventory(unavailable_reason="no driver"), 1)
    with pytest.raises(ValueError, match="--memory-per-slot 20 GiB needs each GPU's memory"):
        plan_service("box", devices, MemoryPerSlot(20 * GIB))


def test_build_plan_refuses_bad_input_with_the_reason() -> None:
    inventory = GpuInventory(unavailable_reason="no driver")
    plan, lines = build_plan(StartOptions("p", gpus=1, slots_per_gpu=2), inventory, {}, "Box_1")
    assert plan.workers[0].name == "box-1"
    assert lines[0].startswith("worker id 'box-1' (from the host name")
    with pytest.raises(Refused, match="--gpus N"):
        build_plan(StartOptions("p"), inventory, {}, "box")


# ---------------------------------------------------------------- GPU memory (issue 24)
# Stated or NVML memory, each worker's memory limit (whole GiB, each device
# rounded down on its own) and what its command line states.

_NO_GPU = GpuInventory(unavailable_reason="no driver")


def _limits(workers: Sequence[ServiceWorker]) -> list[list[tuple[str, int, str]]]:
    return [[(limit.name, limit.size, limit.unit) for limit in w.limits] for w in workers]


def test_stated_memory_sizes_one_workers_memory_limit_over_all_gpus() -> None:
    devices = devices_from(_NO_GPU, 2, 40 * 1024)
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
        "box", devices_from(_NO_GPU, 2, 40 * 1024), SlotsPerGpu(1), per_gpu=True, limit_prefix="v"
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
    plan = plan_service("box", devices_from(_NO_GPU, 2), SlotsPerGpu(1), per_gpu=True)
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
        devices_from(_NO_GPU, 1, 512)


def test_stated_memory_sizes_slots_with_memory_per_slot() -> None:
    plan = plan_service("box", devices_from(_NO_GPU, 1, 40 * 1024), MemoryPerSlot(20 * GIB))
    assert plan.workers[0].slots == 2
    with pytest.raises(ValueError, match="state --gpu-memory too"):
        plan_service("box", devices_from(_NO_GPU, 1), MemoryPerSlot(20 * GIB))


def test_the_workers_command_states_its_gpus_and_memory_only_when_known() -> None:
    stated, _ = build_plan(
        StartOptions("p", worker_id="box", gpus=2, gpu_memory_mib=40960), _NO_GPU, {}, "h"
    )
    assert worker_argv(stated.workers[0], "p", 45)[-4:] == ["--gpus", "2", "--gpu-memory", "40GiB"]
    per_gpu, _ = build_plan(
        StartOptions("p", worker_id="box", gpus=2, gpu_memory_mib=40960, per_gpu=True),
        _NO_GPU,
        {},
        "h",
    )
    assert {tuple(worker_argv(w, "p", 45)[-4:]) for w in per_gpu.workers} == {
        ("--gpus", "1", "--gpu-memory", "40GiB")
    }
    unknown, _ = build_plan(StartOptions("p", worker_id="box", gpus=2), _NO_GPU, {}, "h")
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


# ---------------------------------------------------------------- liveness


def _seen(beat: datetime | None, online: bool = True, pool: str = "p") -> WorkerSighting:
    return WorkerSighting(pool, "w1", online, beat, 5.0)


def test_no_online_record_means_the_name_is_free_without_watching() -> None:
    now = datetime.now(UTC)
    assert watch_seconds([_seen(now, online=False)]) == 0.0
    assert not judge_liveness("w1", [], None).live
    assert not judge_liveness("w1", [_seen(now, online=False)], None).live


def test_online_record_whose_heartbeat_advances_is_live() -> None:
    now = datetime.now(UTC)
    # The server's threshold (3 x 5 s), one pass of its foreman loop (15 s), a margin.
    assert watch_seconds([_seen(now)]) == 40.0
    verdict = judge_liveness("w1", [_seen(now)], [_seen(now + timedelta(seconds=5))])
    assert verdict.live
    assert "is live in work pool 'p'" in verdict.reason


def test_online_record_without_a_new_heartbeat_is_watched_until_offline() -> None:
    now = datetime.now(UTC)
    undecided = judge_liveness("w1", [_seen(now)], [_seen(now)])
    assert undecided.live is None
    verdict = judge_liveness("w1", [_seen(now)], [_seen(now, online=False)])
    assert verdict.live is False
    assert "went OFFLINE without a new heartbeat" in verdict.reason
    with pytest.raises(ValueError, match="watched"):
        judge_liveness("w1", [_seen(now)], None)


# ---------------------------------------------------------------- restarts


def test_restart_backoff_doubles_to_a_cap_and_gives_up_on_a_crash_loop() -> None:
    policy = RestartPolicy(base_s=2, cap_s=60, give_up_after=5, stable_s=120)
    assert [policy.delay(n) for n in (1, 2, 3, 6, 9)] == [2.0, 4.0, 8.0, 60.0, 60.0]
    crashes = 0
    for _ in range(4):
        crashes = policy.crashes_in_a_row(crashes, ran_s=3.0)
    assert crashes == 4
    assert not policy.gives_up(crashes)
    assert policy.gives_up(policy.crashes_in_a_row(crashes, ran_s=3.0))
    # A worker that ran long enough starts a new count.
    assert policy.crashes_in_a_row(4, ran_s=300.0) == 1


# ---------------------------------------------------------------- command line


def test_start_options_parse_memory_and_exclude_slots_per_gpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from prefect_gpu_workers.cli import build_parser

    args = build_parser().parse_args(["start", "--pool", "p", "--memory-per-slot", "20GiB"])
    assert (args.memory_per_slot, args.slots_per_gpu, args.per_gpu) == (20 * GIB, None, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["start", "--pool", "p", "--memory-per-slot", "20GiB", "--slots-per-gpu", "2"]
        )
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["start", "--pool", "p", "--memory-per-slot", "lots"])
    assert "not a memory size: 'lots'" in capsys.readouterr().err


def test_worker_runs_the_pods_entrypoint_with_its_flow_runs() -> None:
    (worker,) = plan_service(
        "box", devices_from(GpuInventory(), 1), SlotsPerGpu(2), flow_runs=5
    ).workers
    argv = worker_argv(worker, "pool", drain_s=45)
    assert argv[1:] == [
        "-m", "prefect_gpu_workers", "worker", "--pool", "pool", "--flow-runs", "5",
        "--limit-prefix", "gpu", "--wait-timeout", "300.0", "--drain-seconds", "45",
    ]  # fmt: skip
    assert worker_argv(worker, "pool", 45, launcher="subprocess")[-2:] == [
        "--launcher", "subprocess"
    ]  # fmt: skip


def test_each_worker_serves_its_metrics_on_a_unix_socket_beside_its_lock() -> None:
    (worker,) = plan_service("box", devices_from(GpuInventory(), 1), SlotsPerGpu(2)).workers
    socket_path = metrics_socket_of(Path("/run/prefect-gpu-workers"), worker.name)
    assert socket_path == Path(f"/run/prefect-gpu-workers/{worker.name}.metrics.sock")
    argv = worker_argv(worker, "pool", 45, metrics_socket=socket_path)
    assert argv[-2:] == ["--metrics-socket", str(socket_path)]
    assert "--metrics-port" not in argv  # a bare machine's worker opens nothing on TCP
    assert metrics_socket_of(Path("/" + "d" * 90), worker.name) is None
