"""A local session: one Prefect server (unless one is given), the workers, their cleanup.

Leaving the session, however it is left, stops every process it started and
every flow-run process those started (found by the session's marker, see
:mod:`prefect_gpu_workers.local.processes`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_gpu_workers.local.plan import WorkerPlan, count_runs
from prefect_gpu_workers.local.prefect_ops import active_slots, online_workers, read_runs
from prefect_gpu_workers.local.processes import (
    SESSION_MARKER_ENV,
    StartedProcess,
    marked_pids,
    start_logged,
    stop_marked,
    worker_command,
)
from prefect_gpu_workers.naming import LIMIT_PREFIX_ENV, WORKER_ID_ENV
from prefect_gpu_workers.server import LocalPrefectServer, stop_process_group

ProgressCallback = Callable[[list[FlowRun], dict[str, int], float], None]


@dataclass
class LocalSession:
    """A server (unless ``PREFECT_API_URL`` is set), workers, and their cleanup.

    Use as a context manager: leaving it, however, stops every process it
    started and every flow-run process those started.
    """

    workdir: Path
    api_url: str | None = None
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    server_start_timeout_s: float = 120.0
    server: LocalPrefectServer | None = None
    workers: dict[str, StartedProcess] = field(default_factory=dict)
    _settings: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> LocalSession:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            if self.api_url is None:
                self.server = LocalPrefectServer(
                    home=self.workdir / "prefect",
                    extra_env={SESSION_MARKER_ENV: self.marker},
                    log_path=self.workdir / "logs" / "server.log",
                )
                (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
                self.server.start(self.server_start_timeout_s)
                self.api_url = self.server.api_url
            self._settings.enter_context(
                temporary_settings(updates={PREFECT_API_URL: self.api_url})
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def client_env(self) -> dict[str, str]:
        """Environment for a process that must use this session's server."""
        env = {**os.environ, SESSION_MARKER_ENV: self.marker}
        if self.server is not None:
            # Our own server: its home, no telemetry, no logs shipped to the API.
            env.update(self.server.env())
        elif self.api_url:
            # Someone else's server: keep the caller's Prefect settings.
            env["PREFECT_API_URL"] = self.api_url
        return env

    @contextlib.contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        """A sync client of this session's server."""
        with get_client(sync_client=True) as client:
            yield client

    def start_workers(
        self,
        plans: Sequence[WorkerPlan],
        pool: str,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """Start one worker entrypoint per plan (each plan's limit must exist already).

        Raises:
            RuntimeError: a worker of that id is running in this session.
        """
        for plan in plans:
            if plan.worker_id in self.workers:
                raise RuntimeError(f"worker {plan.worker_id} is already running")
            env = {
                **self.client_env(),
                **(extra_env or {}),
                WORKER_ID_ENV: plan.worker_id,
                LIMIT_PREFIX_ENV: plan.limit_prefix,
            }
            self.workers[plan.worker_id] = start_logged(
                f"worker {plan.worker_id}",
                worker_command(plan, pool),
                env,
                self.workdir / "logs" / f"worker-{plan.worker_id}.log",
                pool,
            )

    def wait_for_workers(self, pool: str, timeout_s: float = 120.0) -> None:
        """Block until every worker started for ``pool`` is ONLINE (so timing starts fair).

        Raises:
            RuntimeError: a worker exited (its log's tail is in the message).
            TimeoutError: not all online after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        wanted = {wid for wid, started in self.workers.items() if started.pool == pool}
        with self.client() as client:
            while True:
                for started in self.workers.values():
                    if started.proc.poll() is not None:
                        raise RuntimeError(
                            f"{started.name} exited with code {started.proc.returncode}:\n"
                            f"{started.log_tail()}"
                        )
                missing = wanted - online_workers(client, pool)
                if not missing:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"workers not online after {timeout_s:.0f}s: {sorted(missing)}"
                    )
                time.sleep(0.5)

    def stop_workers(self, grace_s: float = 15.0) -> None:
        """SIGTERM every worker's process group, then wait (SIGKILL after ``grace_s``)."""
        workers, self.workers = self.workers, {}
        for started in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.proc.pid, signal.SIGTERM)
        for started in workers.values():
            stop_process_group(started.proc, grace_s)

    def close(self) -> None:
        """Stop the workers, their flow runs and the server; safe to call twice."""
        # A second Ctrl-C must not cut the cleanup short and orphan processes.
        previous = signal.getsignal(signal.SIGINT)
        in_main_thread = _in_main_thread()
        if in_main_thread:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop_workers()
            # Flow runs live in sessions of their own; the worker stops them on
            # SIGTERM, but not always before it exits.
            stop_marked(self.marker)
            if self.server is not None:
                self.server.stop()
            stop_marked(self.marker, grace_s=5.0)
            self._settings.close()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGINT, previous)

    def remaining_pids(self) -> list[int]:
        """Processes of this session still alive (none after :meth:`close`)."""
        return marked_pids(self.marker)

    def wait_for_runs(
        self,
        ids: Sequence[UUID],
        limit_names: Sequence[str],
        on_progress: ProgressCallback | None = None,
        timeout_s: float = 900.0,
        poll_s: float = 1.0,
        since: float | None = None,
    ) -> list[FlowRun]:
        """Poll until every run is final; raises ``TimeoutError`` after ``timeout_s``.

        ``since`` (a ``time.time()``) is where the progress clock starts, e.g.
        before the runs were submitted; submitting many runs takes seconds.
        """
        started = time.time() if since is None else since
        with self.client() as client:
            while True:
                elapsed = time.time() - started
                try:
                    runs = read_runs(client, ids)
                    slots = active_slots(client, limit_names)
                except httpx.TransportError:
                    # The server is restarting (bench --faults does it on purpose).
                    if elapsed > timeout_s:
                        raise
                    time.sleep(poll_s)
                    continue
                if on_progress is not None:
                    on_progress(runs, slots, elapsed)
                if len(runs) == len(ids) and count_runs(runs).done:
                    return runs
                for worker in self.workers.values():
                    if worker.proc.poll() is not None:
                        raise RuntimeError(
                            f"{worker.name} exited with code {worker.proc.returncode} "
                            f"while runs were in flight:\n{worker.log_tail()}"
                        )
                if elapsed > timeout_s:
                    raise TimeoutError(
                        f"runs not finished after {timeout_s:.0f}s: {count_runs(runs)}"
                    )
                time.sleep(poll_s)


def _in_main_thread() -> bool:
    # signal.signal works in the main thread only.
    return threading.current_thread() is threading.main_thread()
