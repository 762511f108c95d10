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
import threading
import time
import uuid
from pathlib import Path

from prefect_gpu_workers.database import EmbeddedPostgresUnavailable, find_bin_dir
from prefect_gpu_workers.procfs import pids_in_directory, pids_with_env
from prefect_gpu_workers.server import LocalPrefectServer

CLI = [sys.executable, "-m", "prefect_gpu_workers.cli"]


def wait_until_gone(name: str, value: str, timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := pids_with_env(name, value)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


class DemoOutput:
    """A demo's output, read line by line in a thread; the test waits for what it says."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str) -> str:
        """The first line matching ``pattern``; fails if the demo ends without one.

        No deadline of its own: pytest's timeout is the hang guard.
        """
        regex = re.compile(pattern)
        with self._changed:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                assert self._reader.is_alive(), f"no line matches {pattern!r}:\n{self.text()}"
                self._changed.wait(1.0)

    def wait_for_exit(self) -> int:
        self._reader.join()
        return self.proc.wait()


def test_ctrl_c_stops_server_workers_and_flow_runs(tmp_path: Path) -> None:
    """A fresh machine (no PREFECT_API_URL): own server; Ctrl-C while GPU steps hold slots.

    Ctrl-C in local mode means "stop now, cleanly": the workers stop their
    flow runs at once (no drain time), then the server stops; a second Ctrl-C
    would make that stop kill instead of wait (test_local_stop.py). The test
    waits for each state it needs (slots held, the stop announced, the exit),
    never for a fixed time.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    prefix = f"c{uuid.uuid4().hex[:6]}"
    demo = subprocess.Popen(
        [*CLI, "demo", "--workers", "1", "--runs", "3", "--worker-prefix", prefix,
         "--workdir", str(tmp_path), "--simulate", "--gpu-seconds", "3600", "--poll-seconds", "2"],
        env={**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    output = DemoOutput(demo)
    server_home = str(tmp_path / "prefect")
    postgres_data = tmp_path / "prefect" / "postgres" / "data"
    embedded_postgres = has_embedded_postgres()
    try:
        # Both slots held: two GPU steps (of an hour each) are running, one waits.
        output.wait_for(rf"GPU slots in use: gpu:{prefix}-1 2/2")
        assert pids_with_env("WORKER_ID", f"{prefix}-1"), "no worker or flow run process seen"
        assert pids_with_env("PREFECT_HOME", server_home), "the demo's own server is not running"
        if embedded_postgres:
            assert pids_in_directory(postgres_data), "the demo's PostgreSQL is not running"
        demo.send_signal(signal.SIGINT)
        output.wait_for(r"stopping 1 worker\(s\), their flow runs and the Prefect server "
                        r"\(Ctrl-C again kills them at once\)")  # fmt: skip
        code = output.wait_for_exit()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    text = output.text()
    assert code == 130, text
    assert re.search(r"^stopped in [0-9.]+ s; nothing left running$", text, re.M), text
    assert text.rstrip().endswith("interrupted"), text
    assert wait_until_gone("WORKER_ID", f"{prefix}-1") == [], "worker or flow run left running"
    assert wait_until_gone("PREFECT_HOME", server_home) == [], "the demo's server was left running"
    assert pids_in_directory(postgres_data) == [], "the demo's PostgreSQL was left running"


def has_embedded_postgres() -> bool:
    try:
        find_bin_dir()
    except EmbeddedPostgresUnavailable:
        return False
    return True


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
