"""``prefect-gpu-workers demo`` as a person runs it: a subprocess, real server, real workers.

After each run, no process it started may be left: the checks scan /proc for
processes whose environment points at the demo's own server or names its
workers (flow-run processes live in sessions of their own, so a process-group
check alone would miss them).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from prefect_gpu_workers.gpu import detect_gpus
from prefect_gpu_workers.procfs import pids_with_env
from prefect_gpu_workers.server import LocalPrefectServer

CLI = [sys.executable, "-m", "prefect_gpu_workers.cli"]
# Short stages and a 2 s worker poll keep these tests to seconds of waiting.
QUICK = [
    "--simulate", "--download-seconds", "1", "--gpu-seconds", "1", "--save-seconds", "1",
    "--poll-seconds", "2",
]  # fmt: skip


def wait_until_gone(name: str, value: str, timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := pids_with_env(name, value)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_demo_runs_reports_and_leaves_nothing_running(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    prefix = f"d{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        [*CLI, "demo", "--workers", "2", "--runs", "6", "--worker-prefix", prefix,
         "--pool", f"demo-{prefix}", "--workdir", str(tmp_path), *QUICK,
         "--timeline", str(tmp_path / "timeline.png"), "--timeline", str(tmp_path / "t.html")],
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"using the Prefect API at {prefect_server.api_url}" in output
    if detect_gpus().count == 0:
        assert "no NVIDIA GPU found" in output
        assert "1 GPU x 2 slot(s)" in output
        assert "no GPU: telemetry off" in output
    assert "Demo report" in output
    assert re.search(r"runs finished / failed\W+6 / 0\b", output), output
    for worker in (f"{prefix}-1", f"{prefix}-2"):
        assert f"gpu:{worker}" in output
    assert "all processes started by the demo have stopped" in output
    assert pids_with_env("WORKER_ID", f"{prefix}-1") == []
    assert pids_with_env("WORKER_ID", f"{prefix}-2") == []
    # Every stage of every run left its record in the work dir.
    assert len(list((tmp_path / "records").glob("*.jsonl"))) == 6
    # The pictures, their paths printed at the end (the unit tests count their bars).
    assert output.rstrip().endswith(f"timeline: {tmp_path / 't.html'}")
    assert f"timeline: {tmp_path / 'timeline.png'}" in output
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert "Plotly.newPlot" in (tmp_path / "t.html").read_text(encoding="utf-8")


def test_ctrl_c_stops_server_workers_and_flow_runs(tmp_path: Path) -> None:
    """A fresh machine (no PREFECT_API_URL): own server; Ctrl-C while GPU steps hold slots."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    prefix = f"c{uuid.uuid4().hex[:6]}"
    demo = subprocess.Popen(
        [*CLI, "demo", "--workers", "1", "--runs", "3", "--worker-prefix", prefix,
         "--workdir", str(tmp_path), "--simulate", "--gpu-seconds", "120", "--poll-seconds", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    server_home = str(tmp_path / "prefect")
    records = tmp_path / "records"
    try:
        deadline = time.monotonic() + 240
        # The GPU step records itself only when it ends; the download record says
        # a flow-run process is up, and with 120 s GPU steps it is then holding a slot
        # or about to.
        while not (records.is_dir() and any(records.glob("*.jsonl"))):
            assert demo.poll() is None, demo.stdout.read() if demo.stdout else ""
            assert time.monotonic() < deadline, "no flow run started"
            time.sleep(0.5)
        assert pids_with_env("WORKER_ID", f"{prefix}-1"), "no worker or flow run process seen"
        assert pids_with_env("PREFECT_HOME", server_home), "the demo's own server is not running"
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=90)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, output
    assert "interrupted" in output
    assert wait_until_gone("WORKER_ID", f"{prefix}-1") == [], "worker or flow run left running"
    assert wait_until_gone("PREFECT_HOME", server_home) == [], "the demo's server was left running"


def test_worker_entrypoint_fails_visibly_when_its_limit_never_appears(
    prefect_server: LocalPrefectServer,
) -> None:
    worker = f"w{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        [*CLI, "worker", "--pool", "nowhere", "--flow-runs", "2", "--wait-timeout", "1"],
        env={**os.environ, "WORKER_ID": worker, "PGW_LIMIT_PREFIX": "gpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"limit gpu:{worker} not ready" in result.stderr
    assert "prefect gcl create" in result.stderr
