"""``prefect-gpu-workers demo`` on its own server (embedded PostgreSQL), as a person runs it.

No PREFECT_API_URL: the demo starts its own Prefect server on the embedded
PostgreSQL. Afterwards nothing it started may be left: Prefect processes are
found by the server home in their environment, PostgreSQL processes by their
working directory (the data directory), both read from /proc.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_gpu_workers.database import EmbeddedPostgresUnavailable, find_bin_dir
from prefect_gpu_workers.gpu import detect_gpus
from prefect_gpu_workers.procfs import pids_in_directory, pids_with_env

CLI = [sys.executable, "-m", "prefect_gpu_workers.cli"]
# Generous: on a busy 2-core machine the server alone takes a minute to start.
DEMO_TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="leftover checks read /proc"
)


@pytest.fixture(autouse=True)
def postgres_available() -> None:
    try:
        find_bin_dir()
    except EmbeddedPostgresUnavailable as exc:
        pytest.skip(f"no embedded PostgreSQL here: {exc}")


def fresh_env() -> dict[str, str]:
    """This environment without Prefect settings: the demo must start its own server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "COLUMNS": "200"}


def left_running(workdir: Path, timeout_s: float = 30.0) -> list[int]:
    """The demo's processes still alive, waiting up to ``timeout_s`` for them to go."""
    home = str(workdir / "prefect")
    data_dir = workdir / "prefect" / "postgres" / "data"
    deadline = time.monotonic() + timeout_s
    while (left := pids_with_env("PREFECT_HOME", home) + pids_in_directory(data_dir)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
    return left


def prefect_server_pid(workdir: Path) -> int | None:
    """The demo's Prefect server: its home in the environment, ``server start`` in argv."""
    for pid in pids_with_env("PREFECT_HOME", str(workdir / "prefect")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server" in argv and b"start" in argv:
            return pid
    return None


def wait_for_a_flow_run(demo: subprocess.Popen[str], workdir: Path) -> None:
    """Block until a flow run recorded its first stage (so runs are in flight)."""
    records = workdir / "records"
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    while not (records.is_dir() and any(records.glob("*.jsonl"))):
        assert demo.poll() is None, demo.stdout.read() if demo.stdout else ""
        assert time.monotonic() < deadline, "no flow run started"
        time.sleep(0.5)


@pytest.fixture
def demos(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Demo processes a test starts; at the end each is continued and killed if still there."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Whatever a failed test left: continue it (a stopped process ignores SIGTERM) and kill it.
    for pid in left_running(tmp_path, timeout_s=0):
        for signum in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                break


def test_demo_on_the_embedded_postgres_reports_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """The first set-up command (README and docs/index.md: ``./hack/demo``), as a
    newcomer runs it: its own server, two workers, a report, the timeline
    pictures, and nothing left running."""
    prefix = f"p{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        [*CLI, "demo", "--workers", "2", "--runs", "4", "--worker-prefix", prefix,
         "--workdir", str(tmp_path), "--simulate", "--download-seconds", "1",
         "--gpu-seconds", "1", "--save-seconds", "1", "--poll-seconds", "2",
         "--timeline", str(tmp_path / "timeline.png"), "--timeline", str(tmp_path / "t.html")],
        env=fresh_env(), capture_output=True, text=True, timeout=DEMO_TIMEOUT_S,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "starting a Prefect server on postgres" in output
    assert "database: PostgreSQL, embedded" in output
    assert str(tmp_path / "prefect" / "postgres" / "data") in output
    if detect_gpus().count == 0:
        assert "no NVIDIA GPU found" in output
        assert "1 GPU x 2 slot(s)" in output
        assert "no GPU: telemetry off" in output
    assert "Demo report" in output
    assert re.search(r"runs finished / failed\W+4 / 0\b", output), output
    for worker in (f"{prefix}-1", f"{prefix}-2"):
        assert f"gpu:{worker}" in output
    assert "Prefect API latency (progress polls)" in output
    assert "all processes started by the demo have stopped" in output
    assert left_running(tmp_path) == []
    # Every stage of every run left its record in the work dir.
    assert len(list((tmp_path / "records").glob("*.jsonl"))) == 4
    # The pictures, their paths printed at the end (the unit tests count their bars).
    assert output.rstrip().endswith(f"timeline: {tmp_path / 't.html'}")
    assert f"timeline: {tmp_path / 'timeline.png'}" in output
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert "Plotly.newPlot" in (tmp_path / "t.html").read_text(encoding="utf-8")


def test_a_frozen_prefect_server_is_reported_and_the_demo_stops_within_its_bound(
    tmp_path: Path, demos: list[subprocess.Popen[str]]
) -> None:
    prefix = f"s{uuid.uuid4().hex[:6]}"
    api_timeout_s = 10
    demo = subprocess.Popen(
        [*CLI, "demo", "--workers", "1", "--runs", "3", "--worker-prefix", prefix,
         "--workdir", str(tmp_path), "--simulate", "--gpu-seconds", "120", "--poll-seconds", "2",
         "--api-timeout", str(api_timeout_s)],
        env=fresh_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    demos.append(demo)
    wait_for_a_flow_run(demo, tmp_path)
    server = prefect_server_pid(tmp_path)
    assert server is not None, "the demo's Prefect server is not running"
    os.kill(server, signal.SIGSTOP)
    try:
        # The bound: the API timeout, then the cleanup (workers, flow runs, a server
        # that only SIGKILL moves, PostgreSQL), each with its own grace period.
        output, _ = demo.communicate(timeout=api_timeout_s + 240)
    finally:
        if demo.poll() is None:
            os.kill(server, signal.SIGCONT)
    assert demo.returncode == 1, output
    assert "Prefect API not answering for" in output
    assert "stopped:" in output
    assert f"logs: {tmp_path / 'logs'}" in output
    assert str(tmp_path / "logs" / "server.log") in output
    assert "every process started here has been stopped" in output
    assert left_running(tmp_path) == []
