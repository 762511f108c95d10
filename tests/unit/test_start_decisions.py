"""Pure decisions of `start`: identity, devices, sizing, liveness, restarts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from prefect_gpu_workers.gpu import GpuDevice, GpuInventory, MigDevice
from prefect_gpu_workers.naming import WorkerIdentityError, validate_worker_id
from prefect_gpu_workers.service.identity import resolve_worker_id, worker_id_from_host_name
from prefect_gpu_workers.service.plan import (
    MemoryPerSlot,
    RestartPolicy,
    SlotsPerGpu,
    WorkerSighting,
    devices_from,
    judge_liveness,
    plan_service,
    watch_seconds,
)
from prefect_gpu_workers.service.run import Refused, StartOptions, build_plan
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
    from prefect_gpu_workers.service.run import worker_argv

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
