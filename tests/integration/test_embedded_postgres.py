"""Local mode's Prefect server on the embedded PostgreSQL: real server binaries, real Prefect.

Leftover checks read /proc directly: a PostgreSQL server process runs in its
data directory, so a process whose working directory is the data directory
is one of its processes, whatever its parent or process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_gpu_workers.database import (
    POSTGRES_BIN_DIR_ENV,
    SOCKET_FILE,
    UNIX_SOCKET_PATH_MAX,
    EmbeddedPostgres,
    EmbeddedPostgresUnavailable,
    find_bin_dir,
)
from prefect_gpu_workers.procfs import pids_in_directory
from prefect_gpu_workers.server import LocalPrefectServer, SqliteFallbackWarning

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="leftover checks read /proc"
)


def wait_for_no_server(data_dir: Path, timeout_s: float = 60.0) -> list[int]:
    """Wait until no process works in ``data_dir``; returns those left at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (left := pids_in_directory(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def psql(postgres: EmbeddedPostgres, query: str) -> str:
    """Run ``query`` with the wheel's psql over the server's Unix socket."""
    return subprocess.run(
        [str(find_bin_dir() / "psql"), "-h", str(postgres.socket_dir), "-U", "postgres",
         "-d", "postgres", "-Atc", query],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip


@pytest.fixture
def postgres_available() -> None:
    try:
        find_bin_dir()
    except EmbeddedPostgresUnavailable as exc:
        pytest.skip(f"no embedded PostgreSQL here: {exc}")


# An owner process like the CLI: SIGTERM takes the Ctrl-C path and stops what it started.
OWNER = """
import signal, sys, threading, time
from pathlib import Path
from prefect_gpu_workers.database import EmbeddedPostgres

def interrupt(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, interrupt)
postgres = EmbeddedPostgres(Path(sys.argv[1]))
if sys.argv[2] == "thread":
    # Started from a thread that ends: no parent-death signal, so it stays behind.
    starter = threading.Thread(target=postgres.start)
    starter.start()
    starter.join()
else:
    postgres.start()
if sys.argv[2] == "thread":
    print(postgres.pid, flush=True)
    import os
    os._exit(0)
try:
    # Printed inside the try: a SIGTERM right after the pid line is still handled.
    print(postgres.pid, flush=True)
    while True:
        time.sleep(3600)
except KeyboardInterrupt:
    postgres.stop()
"""


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Owner processes started by a test; killed at the end whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for data_dir in tmp_path.glob("**/data"):
        for pid in pids_in_directory(data_dir):
            os.kill(pid, signal.SIGKILL)


def start_owner(
    started: list[subprocess.Popen[str]], root: Path, mode: str = "main"
) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(root), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"owner did not start postgres: {line!r}\n{err}")
    return proc, int(line)


@pytest.mark.usefixtures("postgres_available")
def test_prefect_on_postgres_serves_a_limit_and_keeps_its_lease_across_a_restart(
    tmp_path: Path,
) -> None:
    home = tmp_path / "prefect"
    data_dir = home / "postgres" / "data"
    limit = f"gpu:pg-{uuid.uuid4().hex[:6]}"
    server = LocalPrefectServer(home, database="postgres").start()
    try:
        assert server.database_in_use == "postgres"
        assert server.fallback_reason is None
        assert server.postgres is not None
        assert server.postgres.data_dir == data_dir
        # Unix socket only: nothing listens on TCP.
        assert psql(server.postgres, "show listen_addresses") == ""
        assert (server.postgres.socket_dir / SOCKET_FILE).exists()
        with (
            temporary_settings(updates={PREFECT_API_URL: server.api_url}),
            get_client(sync_client=True) as client,
        ):
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=limit, limit=2)
            )
            lease_id = client.increment_concurrency_slots_with_lease(
                names=[limit], slots=1, mode="concurrency", lease_duration=300
            ).json()["lease_id"]
            assert client.read_global_concurrency_limit_by_name(limit).active_slots == 1
        # Prefect keeps its tables in the embedded server.
        assert psql(server.postgres, "select count(*) from concurrency_limit_v2") == "1"
    finally:
        server.stop()
    assert pids_in_directory(data_dir) == [], "stop left a postgres process"

    # Same home and port: the database and the lease are still there.
    restarted = LocalPrefectServer(home, port=server.port, database="postgres").start()
    try:
        assert restarted.database_in_use == "postgres"
        with (
            temporary_settings(updates={PREFECT_API_URL: restarted.api_url}),
            get_client(sync_client=True) as client,
        ):
            assert client.read_global_concurrency_limit_by_name(limit).active_slots == 1
            client.release_concurrency_slots_with_lease(lease_id)
            assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
    finally:
        restarted.stop()
    assert pids_in_directory(data_dir) == [], "stop left a postgres process"


@pytest.mark.usefixtures("postgres_available")
def test_sigterm_to_the_owner_shuts_postgres_down(
    tmp_path: Path, owner: list[subprocess.Popen[str]]
) -> None:
    root = tmp_path / "pg"
    proc, postmaster = start_owner(owner, root)
    assert postmaster in pids_in_directory(root / "data")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert pids_in_directory(root / "data") == []
    # A clean shutdown, not a kill: the server logged its end.
    assert "database system is shut down" in (root / "postgres.log").read_text()


@pytest.mark.usefixtures("postgres_available")
def test_sigkill_to_the_owner_still_shuts_postgres_down(
    tmp_path: Path, owner: list[subprocess.Popen[str]]
) -> None:
    root = tmp_path / "pg"
    proc, postmaster = start_owner(owner, root)
    assert postmaster in pids_in_directory(root / "data")
    proc.kill()  # no cleanup runs: the parent-death signal is all there is
    proc.wait(timeout=60)
    assert wait_for_no_server(root / "data") == []
    assert "database system is shut down" in (root / "postgres.log").read_text()


@pytest.mark.usefixtures("postgres_available")
def test_a_server_left_behind_in_the_data_directory_is_stopped_before_a_new_start(
    tmp_path: Path, owner: list[subprocess.Popen[str]]
) -> None:
    root = tmp_path / "pg"
    proc, leftover = start_owner(owner, root, mode="thread")
    proc.wait(timeout=60)
    assert leftover in pids_in_directory(root / "data"), "the leftover server is not running"
    postgres = EmbeddedPostgres(root).start()
    try:
        assert postgres.pid != leftover
        assert leftover not in pids_in_directory(root / "data")
        assert psql(postgres, "select 1") == "1"
    finally:
        postgres.stop()
    assert pids_in_directory(root / "data") == []


@pytest.mark.usefixtures("postgres_available")
def test_a_work_directory_too_deep_for_a_socket_path_gets_a_short_socket_directory(
    tmp_path: Path,
) -> None:
    root = tmp_path / ("d" * 60) / ("e" * 60) / "pg"
    assert len(os.fsencode(root / "run" / SOCKET_FILE)) > UNIX_SOCKET_PATH_MAX
    postgres = EmbeddedPostgres(root).start()
    try:
        socket_dir = postgres.socket_dir
        assert not socket_dir.is_relative_to(root)
        assert len(os.fsencode(socket_dir / SOCKET_FILE)) <= UNIX_SOCKET_PATH_MAX
        assert psql(postgres, "show data_directory") == str((root / "data").resolve())
    finally:
        postgres.stop()
    assert not socket_dir.exists(), "the temporary socket directory was left behind"
    assert pids_in_directory(root / "data") == []


def test_without_the_embedded_server_the_prefect_server_warns_and_uses_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-postgres-here"
    monkeypatch.setenv(POSTGRES_BIN_DIR_ENV, str(missing))
    server = LocalPrefectServer(tmp_path / "prefect", database="postgres")
    with pytest.warns(SqliteFallbackWarning, match="uses SQLite") as warned:
        server.start()
    try:
        assert str(missing / "initdb") in str(warned[0].message)
        assert server.database_in_use == "sqlite"
        assert server.fallback_reason is not None
        assert "no executable" in server.fallback_reason
        assert server.postgres is None
        assert httpx.get(f"{server.api_url}/health", timeout=30).status_code == 200
        assert (tmp_path / "prefect" / "prefect.db").exists()
    finally:
        server.stop()
