"""Start and stop one local Prefect server that every local process shares.

Prefect's per-process ephemeral mode would give each worker its own server and
coordinate nothing, so local mode and the test suite run one real server and
point every process at it through ``PREFECT_API_URL``.

The server keeps its database and its concurrency leases under its home:
SQLite (``prefect.db``) or an embedded PostgreSQL (``postgres/``, see
:mod:`prefect_gpu_workers.database`), and leases on disk, so that a slot held
across a server restart is still released by its holder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

import httpx

from prefect_gpu_workers.database import (
    DatabaseKind,
    EmbeddedPostgres,
    EmbeddedPostgresUnavailable,
    die_with_parent,
)
from prefect_gpu_workers.stopping import wait_until

# Where the server keeps concurrency leases. Local mode's servers keep them on
# disk (under PREFECT_HOME), not in Prefect's default in-memory store, which
# forgets every lease on restart and leaves those slots held for good; a test
# or `bench --faults` asks for "memory" when a restart must lose them.
LEASE_STORAGE_ENV = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"
LeaseStorage = Literal["filesystem", "memory"]
LEASE_STORAGES: dict[LeaseStorage, str] = {
    "filesystem": "prefect.server.concurrency.lease_storage.filesystem",
    "memory": "prefect.server.concurrency.lease_storage.memory",
}
DATABASE_URL_ENV = "PREFECT_SERVER_DATABASE_CONNECTION_URL"
# For the embedded PostgreSQL on a machine whose CPU the flow runs take:
# Prefect's pool (5 + 10 overflow) runs dry under 8 workers and 48 flow runs
# (requests wait 30 s for a connection, then fail), and its 10 s statement and
# 5 s connect timeouts turn a starved moment into HTTP 500s that crash
# workers. The embedded server allows 200 connections.
POSTGRES_SERVER_ENV = {
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "40",
    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
    "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",
}
# Its older name: a caller's value there must not override ours.
LEGACY_DATABASE_URL_ENV = "PREFECT_API_DATABASE_CONNECTION_URL"


class SqliteFallbackWarning(RuntimeWarning):
    """PostgreSQL was asked for but could not start; the server runs on SQLite."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def quiet_prefect_env(home: Path) -> dict[str, str]:
    """Settings every process of a local setup shares: one home, no telemetry."""
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
    }


def wait_for_api(
    api_url: str, timeout_s: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until ``{api_url}/health`` answers, or raise with the reason."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"Prefect server exited with code {proc.returncode} while starting")
        try:
            if httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last_error = str(exc)
        time.sleep(0.25)
    raise TimeoutError(f"Prefect API at {api_url} not healthy after {timeout_s:.0f}s: {last_error}")


@dataclass
class LocalPrefectServer:
    """``prefect server start`` on ``host`` (127.0.0.1) with its database and leases under ``home``.

    ``database="postgres"`` runs the server on an embedded PostgreSQL in
    ``home/postgres``; when that cannot start, the server runs on SQLite,
    ``database_in_use`` says ``"sqlite"``, ``fallback_reason`` says why, and a
    :class:`SqliteFallbackWarning` is issued.

    Example:
        >>> with LocalPrefectServer(workdir / "prefect", database="postgres") as server:
        ...     print(server.database_in_use, server.api_url)  # doctest: +SKIP
    """

    home: Path
    port: int = field(default_factory=free_port)
    # Where it listens: loopback, or an address containers reach (a node's bridge).
    host: str = "127.0.0.1"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    database: DatabaseKind = "sqlite"
    lease_storage: LeaseStorage = "filesystem"
    # Set by start(): the database the server really uses, and why not the one asked for.
    database_in_use: DatabaseKind | None = None
    fallback_reason: str | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _postgres: EmbeddedPostgres | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    def env(self) -> dict[str, str]:
        """Environment a client process needs to use this server."""
        return {**quiet_prefect_env(self.home), "PREFECT_API_URL": self.api_url}

    @property
    def pid(self) -> int | None:
        """The server process's pid while it runs (a fault drill may SIGSTOP it)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def postgres(self) -> EmbeddedPostgres | None:
        """The embedded PostgreSQL while it serves this server, else ``None``."""
        return self._postgres

    def start(self, timeout_s: float = 180.0) -> LocalPrefectServer:
        """Start the database (if PostgreSQL), then the server; wait until ``/health`` answers.

        Raises:
            RuntimeError, TimeoutError: the Prefect server did not come up (nothing is
                left running then). An embedded PostgreSQL that cannot start is not an
                error: the server falls back to SQLite.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path or self.home / "server.log"
        try:
            database_url = self._start_database(log_path.parent)
            env = {**os.environ, **quiet_prefect_env(self.home), **self.extra_env}
            env.pop("PREFECT_API_URL", None)
            env.pop(LEGACY_DATABASE_URL_ENV, None)
            env[DATABASE_URL_ENV] = database_url
            if self.database_in_use == "postgres":
                env.update(POSTGRES_SERVER_ENV)
            env[LEASE_STORAGE_ENV] = LEASE_STORAGES[self.lease_storage]
            with log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "prefect", "server", "start",
                     "--host", self.host, "--port", str(self.port)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    # Should this process be SIGKILLed, the server goes too.
                    preexec_fn=die_with_parent(signal.SIGTERM),
                )  # fmt: skip
            wait_for_api(self.api_url, timeout_s, self._proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_database(self, log_dir: Path) -> str:
        """Start the database asked for, or fall back to SQLite; returns the URL."""
        self.fallback_reason = None
        if self.database == "postgres":
            postgres = EmbeddedPostgres(self.home / "postgres", log_path=log_dir / "postgres.log")
            try:
                self._postgres = postgres.start()
            except EmbeddedPostgresUnavailable as exc:
                self.fallback_reason = str(exc)
                warnings.warn(
                    f"embedded PostgreSQL unavailable, the Prefect server uses SQLite "
                    f"(it can lock up under many workers): {exc}",
                    SqliteFallbackWarning,
                    stacklevel=3,
                )
            else:
                self.database_in_use = "postgres"
                return postgres.connection_url
        self.database_in_use = "sqlite"
        return f"sqlite+aiosqlite:///{self.home / 'prefect.db'}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 10.0, hurry: threading.Event | None = None) -> None:
        """Stop the server, then its database; idempotent, leaves no process of either.

        Once ``hurry`` is set (a second Ctrl-C) the grace periods end at once: SIGKILL.
        """
        proc, self._proc = self._proc, None
        postgres, self._postgres = self._postgres, None
        try:
            if proc is not None and proc.poll() is None:
                stop_process_group(proc, grace_s, hurry)
        finally:
            if postgres is not None:
                postgres.stop(hurry=hurry)

    def __enter__(self) -> LocalPrefectServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_process_group(
    proc: subprocess.Popen[bytes], grace_s: float = 10.0, hurry: threading.Event | None = None
) -> None:
    """SIGTERM the process group, then SIGKILL it if it outlives ``grace_s`` (or once hurried).

    Returns once ``proc`` is reaped; the rest of its group was sent SIGKILL.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    if not wait_until(lambda: proc.poll() is not None, grace_s, hurry):
        # The leader outlived its grace (or the stop was hurried): the whole group goes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
