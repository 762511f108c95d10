"""``prefect-gpu-workers bench --json`` on real workers against the test server (tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from prefect_gpu_workers.server import LocalPrefectServer

REQUIRED_KEYS = {
    "task_level_runs_per_s",
    "flow_level_runs_per_s",
    "ratio",
    "slot_utilization",
    "handoff_gap_p50_s",
    "handoff_gap_p95_s",
    "max_gpu_overlap_per_worker",
    "limit_per_worker",
    "slot_utilization_per_worker",
    "task_level_polling_runs_per_s",
    "polling_slot_utilization",
    "polling_slot_utilization_per_worker",
    "polling_handoff_gap_p50_s",
    "polling_handoff_gap_p95_s",
}


def test_bench_json_is_one_object_with_every_phase(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    prefix = f"b{uuid.uuid4().hex[:6]}"
    worker = f"{prefix}-1"
    picture = tmp_path / "bench.png"
    result = subprocess.run(
        [sys.executable, "-m", "prefect_gpu_workers.cli", "bench", "--json",
         "--workers", "1", "--runs", "4", "--gpu-seconds", "1", "--poll-seconds", "2",
         "--worker-prefix", prefix, "--pool", f"bench-{prefix}", "--timeline", str(picture)],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # stdout is exactly one JSON object; progress went to stderr.
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    assert report.keys() >= REQUIRED_KEYS
    assert report["simulated"] is True
    assert report["database"] == "external"  # PREFECT_API_URL set: that server, none started
    assert "simulated" in result.stderr
    assert report["limit_per_worker"] == {worker: 2}
    assert 1 <= report["max_gpu_overlap_per_worker"][worker] <= 2
    for phase in ("task_level", "task_level_polling", "flow_level"):
        assert report[phase]["runs_finished"] == 4
        assert report[phase]["runs_failed"] == 0
        assert report[phase]["max_gpu_overlap_per_worker"][worker] <= 2
    assert report["settings"]["flow_level_flow_runs_per_worker"] == 2
    assert report["settings"]["task_level_flow_runs_per_worker"] == 8
    assert report["ceiling_runs_per_s"] == {
        "task_level_runs_per_s": 2.0,
        "flow_level_runs_per_s": 2 / 3,
    }
    assert report["task_level_runs_per_s"] > 0
    assert report["flow_level_runs_per_s"] > 0
    assert report["ratio"] == report["task_level_runs_per_s"] / report["flow_level_runs_per_s"]
    assert 0 < report["slot_utilization"] <= 1
    assert report["slot_utilization_per_worker"][worker] == report["slot_utilization"]
    assert 0 < report["polling_slot_utilization_per_worker"][worker] <= 1
    assert report["slots_held_after"] == {f"gpu:{worker}": 0}
    phases = {"task-level", "task-level-subprocess", "task-level-polling", "flow-level"}
    assert set(report["gpu_telemetry"]) == phases
    # Flow-run start-up, measured for both launchers in this one run.
    assert report["launcher"] == "fork"
    subprocess_phase = report["task_level_subprocess"]
    assert subprocess_phase["runs_finished"] == 4
    assert subprocess_phase["runs_failed"] == 0
    for figures in (report["task_level"], subprocess_phase):
        assert 0 < figures["start_up_p50_s"] <= figures["start_up_p95_s"]
        assert figures["start_cpu_mean_s"] > 0
    assert report["start_up_p95_s"] == report["task_level"]["start_up_p95_s"]
    assert f"timeline: {picture}" in result.stderr
    assert picture.read_bytes()[:4] == b"\x89PNG"


def _limit(name: str) -> tuple[int, int]:
    """(size, slots held) of a limit on the test server."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    return limit.limit, limit.active_slots


def test_memory_bench_places_by_memory_beside_fixed_slots_and_licences_never_deadlock(
    prefect_server: LocalPrefectServer,
) -> None:
    prefix = f"m{uuid.uuid4().hex[:6]}"
    worker = f"{prefix}-1"
    result = subprocess.run(
        [sys.executable, "-m", "prefect_gpu_workers.cli", "bench", "--json",
         "--memory-mix", "8GiB:3,40GiB:1", "--gpus", "2", "--gpu-memory", "80GiB",
         "--runs", "8", "--gpu-seconds", "1", "--licence-runs", "6", "--poll-seconds", "2",
         "--worker-prefix", prefix],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=500,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    placement, fixed = report["placement"], report["fixed_slots"]
    assert placement["slots_per_worker"] == 20  # 2 GPUs x 80 GiB / 8 GiB: memory bounds it
    assert fixed["slots_per_worker"] == 4  # 2 GPUs x (80 GiB // 40 GiB)
    for phase in (placement, fixed):
        assert phase["completed"] == phase["submitted"] == 8
        assert phase["slot_over_admissions"] == 0
        assert 0 < phase["utilisation"] <= 1
    assert placement["over_gpu"] == placement["over_memory_limit"] == 0
    assert placement["capacity_gib"] == 160
    # Fixed slots counted the same declared memory: 3 x 8 + 40 per round of the mix.
    assert fixed["declared_gib_s"] > 0
    assert report["utilisation_ratio"] == placement["utilisation"] / fixed["utilisation"]
    licences = report["licences"]
    assert licences["completed"] == licences["runs"] == 6
    assert licences["stalled"] == 0
    assert licences["peak_seats_held"] <= licences["seats"] == 2
    assert sum(licences["held_after"].values()) == 0
    # The memory limit's life in local mode: made with the worker, nothing held after.
    assert _limit(f"gpu-memory:{worker}") == (160, 0)
    assert _limit(f"gpu:{worker}")[1] == 0


def test_demo_places_gpu_steps_on_gpus_with_room(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    from prefect_gpu_workers.records import read_records
    from prefect_gpu_workers.report import memory_use

    prefix = f"d{uuid.uuid4().hex[:6]}"
    worker = f"{prefix}-1"
    picture = tmp_path / "demo.html"
    result = subprocess.run(
        [sys.executable, "-m", "prefect_gpu_workers.cli", "demo", "--simulate",
         "--workers", "1", "--runs", "6", "--memory-mix", "8GiB:1,40GiB:1", "--gpus", "2",
         "--gpu-memory", "48GiB", "--download-seconds", "0", "--gpu-seconds", "1",
         "--save-seconds", "0", "--poll-seconds", "2", "--worker-prefix", prefix,
         "--pool", f"demo-{prefix}", "--workdir", str(tmp_path / "work"),
         "--timeline", str(picture)],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    said = " ".join(result.stdout.split())  # the console wraps long lines
    assert "placed on 2 GPU(s) of 48 GiB per worker (stated)" in said
    assert "0 placement(s) beyond a GPU's memory, 0 past a memory limit" in said
    steps = [r for r in read_records(tmp_path / "work" / "records") if r.stage == "gpu"]
    assert len(steps) == 6
    assert sorted(r.memory_gib or 0 for r in steps) == [8, 8, 8, 40, 40, 40]
    assert {r.placed_on for r in steps} <= {"cuda:0", "cuda:1"}
    use = memory_use(steps, gpu_gib=48, worker_gib={worker: 96})
    assert (use.over_gpu, use.over_memory_limit) == (0, 0)
    assert _limit(f"gpu-memory:{worker}") == (96, 0)
    assert "declared GiB held" in picture.read_text()
