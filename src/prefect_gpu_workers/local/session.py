"""A local session: one Prefect server (unless one is given), the workers, their cleanup.

Leaving the session, however it is left, stops every process it started and
every flow-run process those started (found by the session's marker, see
:mod:`prefect_gpu_workers.local.processes`).

The session never waits silently on the Prefect API: batches are watched from
a thread (:mod:`prefect_gpu_workers.local.watch`), its own client's requests
have short timeouts, and an API silent for longer than
``api_timeout_s`` ends the session with :class:`SessionFailed`, which says why
and where the logs are, once everything has been stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import (
    PREFECT_API_REQUEST_TIMEOUT,
    PREFECT_API_URL,
    temporary_settings,
)

from prefect_gpu_workers.database import DatabaseKind
from prefect_gpu_workers.local.plan import DEFAULT_API_TIMEOUT_S, WorkerPlan, count_runs
from prefect_gpu_workers.local.prefect_ops import online_workers
from prefect_gpu_workers.local.processes import (
    SESSION_MARKER_ENV,
    StartedProcess,
    marked_pids,
    start_logged,
    stop_marked,
    worker_command,
)
from prefect_gpu_workers.local.watch import ApiUnresponsive, ApiWatch, LatencySummary
from prefect_gpu_workers.naming import LIMIT_PREFIX_ENV, WORKER_ID_ENV
from prefect_gpu_workers.server import (
    LeaseStorage,
    LocalPrefectServer,
    SqliteFallbackWarning,
    stop_process_group,
)
from prefect_gpu_workers.stopping import StopSignals, installed_hurry, wait_until

# Grace periods of a stop, before SIGKILL. A local worker stops its runs at
# once (no drain time) and then sets a few states: seconds, even when busy.
WORKER_STOP_GRACE_S = 20.0
# A flow run given SIGTERM leaves its GPU block and reports itself crashed.
FLOW_RUN_STOP_GRACE_S = 10.0

# (runs, slots held per limit, seconds since submission, seconds the API has been silent)
ProgressCallback = Callable[[list[FlowRun], dict[str, int], float, float], None]
# Failures that end a session with a reason rather than a traceback: the API,
# a process, or a deadline. Programming errors keep their traceback.
OPERATIONAL_ERRORS: tuple[type[BaseException], ...] = (
    ApiUnresponsive,
    TimeoutError,
    RuntimeError,
    httpx.HTTPError,
    PrefectHTTPStatusError,
)


class SessionFailed(RuntimeError):
    """A session stopped before its work was done; every process it started is stopped.

    ``str()`` gives the reason; ``log_dir`` holds the server's, the database's
    and the workers' logs.
    """

    def __init__(self, reason: str, log_dir: Path, left_running: Sequence[int] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_dir = log_dir
        # Pids of the session's processes still alive after its cleanup (none, normally).
        self.left_running = list(left_running)

    def log_files(self) -> list[Path]:
        """The log files in ``log_dir``, by name."""
        return sorted(self.log_dir.glob("*.log")) if self.log_dir.is_dir() else []


@dataclass
class LocalSession:
    """A server (unless ``PREFECT_API_URL`` is set), workers, and their cleanup.

    Use as a context manager: leaving it, however, stops every process it
    started and every flow-run process those started.
    """

    workdir: Path
    api_url: str | None = None
    # The database of the session's own server (none when api_url is given).
    database: DatabaseKind = "postgres"
    api_timeout_s: float = DEFAULT_API_TIMEOUT_S
    # Where the session's own server keeps leases (LocalPrefectServer.lease_storage).
    lease_storage: LeaseStorage = "filesystem"
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    # A busy small machine can take minutes (server import, then migrations).
    server_start_timeout_s: float = 300.0
    # Where the session says how a stop on Ctrl-C goes (None: silent).
    say: Callable[[str], None] | None = None
    # Set by a second Ctrl-C (see StopSignals): the stop waits no more.
    hurry: threading.Event = field(default_factory=installed_hurry)
    # How long a stop lets the workers, then the flow runs, go on SIGTERM.
    worker_stop_grace_s: float = WORKER_STOP_GRACE_S
    flow_run_stop_grace_s: float = FLOW_RUN_STOP_GRACE_S
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
                    log_path=self.log_dir / "server.log",
                    database=self.database,
                    lease_storage=self.lease_storage,
                )
                self.log_dir.mkdir(parents=True, exist_ok=True)
                with warnings.catch_warnings():
                    # The caller shows server.fallback_reason its own way.
                    warnings.simplefilter("ignore", SqliteFallbackWarning)
                    self.server.start(self.server_start_timeout_s)
                self.api_url = self.server.api_url
            # This process's own calls keep Prefect's retries (a busy server
            # answers 503 for a while) but each try waits api_timeout_s / 6:
            # a frozen API fails a call after about 1.5 x api_timeout_s
            # (6 tries plus backoff), not Prefect's 6 x 60 s plus backoff.
            self._settings.enter_context(
                temporary_settings(
                    updates={
                        PREFECT_API_URL: self.api_url,
                        PREFECT_API_REQUEST_TIMEOUT: max(5.0, self.api_timeout_s / 6),
                    }
                )
            )
        except BaseException as exc:
            self.close()
            self._raise_failed(exc)
            raise
        return self

    @property
    def database_in_use(self) -> str:
        """``postgres`` or ``sqlite`` for the session's own server, ``external`` otherwise."""
        if self.server is None or self.server.database_in_use is None:
            return "external"
        return self.server.database_in_use

    def describe_database(self) -> str:
        """One line for a person: which database the Prefect server uses, and where."""
        server = self.server
        if server is None:
            return f"database: the one of the Prefect server at {self.api_url} (none started here)"
        if server.postgres is not None:
            return (
                f"database: PostgreSQL, embedded (data {server.postgres.data_dir}, "
                f"Unix socket in {server.postgres.socket_dir}, no TCP)"
            )
        where = server.home / "prefect.db"
        if server.fallback_reason:
            return (
                f"database: SQLite ({where}), because the embedded PostgreSQL could not start: "
                f"{server.fallback_reason}. SQLite can lock up under many workers."
            )
        return f"database: SQLite ({where})"

    @property
    def log_dir(self) -> Path:
        """Where the server's, the database's and the workers' logs go."""
        return self.workdir / "logs"

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(interrupted=isinstance(exc, KeyboardInterrupt))
        if exc is not None:
            self._raise_failed(exc)

    def _raise_failed(self, exc: BaseException) -> None:
        # Called once everything is stopped: an operational failure becomes a
        # reason and the logs' place; anything else propagates as it is.
        if isinstance(exc, OPERATIONAL_ERRORS) and not isinstance(exc, SessionFailed):
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, httpx.HTTPError):
                reason = f"Prefect API request failed: {type(exc).__name__} {exc}".strip()
            raise SessionFailed(reason, self.log_dir, self.remaining_pids()) from exc

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

    def stop_workers(self, grace_s: float | None = None) -> None:
        """SIGTERM every worker's process group, then wait (SIGKILL after ``grace_s``).

        A local worker has no drain time: it stops its flow runs at once, sets
        their states and gives their slots back (see :func:`worker_command`).
        """
        workers = self._sigterm_workers()
        self._reap(workers, self.worker_stop_grace_s if grace_s is None else grace_s)

    def _sigterm_workers(self) -> list[StartedProcess]:
        """SIGTERM every worker's process group; the workers, now no longer the session's."""
        workers, self.workers = list(self.workers.values()), {}
        for started in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.proc.pid, signal.SIGTERM)
        return workers

    def _reap(self, workers: Sequence[StartedProcess], grace_s: float) -> None:
        # One grace period for all of them, not one each; SIGKILL what outlives it.
        wait_until(lambda: all(w.proc.poll() is not None for w in workers), grace_s, self.hurry)
        for started in workers:
            stop_process_group(started.proc, grace_s=0)

    def close(self, interrupted: bool = False) -> None:
        """Stop the workers, their flow runs and the server; safe to call twice.

        The workers and every flow-run process get SIGTERM together (the
        workers set their runs' states and give the slots back; a flow run
        leaves its GPU block), then the server and its database stop. Each step
        SIGKILLs what outlives its grace period, and once :attr:`hurry` is set
        (a second Ctrl-C) no step waits any more.

        Args:
            interrupted: the session is left on Ctrl-C or SIGTERM: say what is
                being stopped, how to cut it short, and how it ended.
        """
        with self._signals_hurry():
            began = time.monotonic()
            if interrupted:
                self._say(
                    f"stopping {len(self.workers)} worker(s), their flow runs"
                    f"{' and the Prefect server' if self.server is not None else ''} "
                    "(Ctrl-C again kills them at once) ..."
                )
            workers = self._sigterm_workers()
            # Flow runs live in sessions of their own: the marker finds them. The
            # workers (stopping meanwhile) and the server are spared here.
            spared = {w.proc.pid for w in workers}
            if self.server is not None and self.server.pid is not None:
                spared.add(self.server.pid)
            stop_marked(self.marker, self.flow_run_stop_grace_s, self.hurry, spare_groups=spared)
            self._reap(workers, self.worker_stop_grace_s)
            if self.server is not None:
                self.server.stop(hurry=self.hurry)
            # Anything still marked (a flow run that was starting): its last chance.
            stop_marked(self.marker, grace_s=5.0, hurry=self.hurry)
            self._settings.close()
            if interrupted:
                left = self.remaining_pids()
                how = "killed" if self.hurry.is_set() else "stopped"
                self._say(
                    f"{how} in {time.monotonic() - began:.1f} s"
                    + (f"; still running: {left}" if left else "; nothing left running")
                )

    @contextlib.contextmanager
    def _signals_hurry(self) -> Iterator[None]:
        """While stopping, SIGINT and SIGTERM hurry the stop instead of interrupting it.

        A caller that installed :class:`StopSignals` already gets that; anyone
        else (a test, a library user) gets the same for the duration of the stop.
        """
        if not _in_main_thread() or isinstance(signal.getsignal(signal.SIGINT), StopSignals):
            yield
            return

        def hurry(signum: int, frame: FrameType | None) -> None:
            self.hurry.set()

        previous = {sig: signal.signal(sig, hurry) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _say(self, line: str) -> None:
        if self.say is not None:
            self.say(line)

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
        """Wait until every run is final and return them (see :meth:`watch_runs`)."""
        runs, _ = self.watch_runs(ids, limit_names, on_progress, timeout_s, poll_s, since)
        return runs

    def watch_runs(
        self,
        ids: Sequence[UUID],
        limit_names: Sequence[str],
        on_progress: ProgressCallback | None = None,
        timeout_s: float = 900.0,
        poll_s: float = 1.0,
        since: float | None = None,
    ) -> tuple[list[FlowRun], LatencySummary]:
        """Wait until every run is final; returns them and the API latency the polls saw.

        The API is polled from a thread (:class:`ApiWatch`), so ``on_progress``
        is called every ``poll_s`` whether or not the API answers. ``since`` (a
        ``time.time()``) is where the progress clock starts, e.g. before the
        runs were submitted; submitting many runs takes seconds.

        Raises:
            ApiUnresponsive: the API was silent for more than ``api_timeout_s``.
            TimeoutError: runs not all final after ``timeout_s``.
            RuntimeError: a worker exited while runs were in flight.
        """
        if self.api_url is None:
            raise RuntimeError("the session has not been entered")
        started = time.time() if since is None else since
        # A request may take up to the whole bound: a starved server that answers
        # slowly is slow, not silent; silence is no answer for api_timeout_s.
        with ApiWatch(
            self.api_url, ids, limit_names, poll_s, request_timeout_s=self.api_timeout_s
        ) as watch:
            while True:
                snapshot = watch.snapshot()
                runs = snapshot.runs or []
                elapsed = time.time() - started
                # Nothing to show before the first answer, unless it is late.
                if on_progress is not None and (
                    snapshot.runs is not None or snapshot.silent_for_s > 2 * poll_s
                ):
                    on_progress(runs, snapshot.slots, elapsed, snapshot.silent_for_s)
                if len(runs) == len(ids) and count_runs(runs).done:
                    return runs, watch.latency()
                for worker in self.workers.values():
                    if worker.proc.poll() is not None:
                        raise RuntimeError(
                            f"{worker.name} exited with code {worker.proc.returncode} "
                            f"while runs were in flight:\n{worker.log_tail()}"
                        )
                if snapshot.silent_for_s > self.api_timeout_s:
                    raise ApiUnresponsive(
                        f"Prefect API not answering for {snapshot.silent_for_s:.0f} s "
                        f"(limit {self.api_timeout_s:.0f} s; last error: "
                        f"{snapshot.last_error or 'none, requests still waiting'}); "
                        f"runs at the last answer: {count_runs(runs)}"
                    )
                if elapsed > timeout_s:
                    raise TimeoutError(
                        f"runs not finished after {timeout_s:.0f}s: {count_runs(runs)}"
                    )
                time.sleep(poll_s)


def _in_main_thread() -> bool:
    # signal.signal works in the main thread only.
    return threading.current_thread() is threading.main_thread()
