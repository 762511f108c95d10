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
