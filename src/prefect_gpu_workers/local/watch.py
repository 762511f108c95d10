"""Watch a batch through the Prefect API from a thread, so that nothing waits on a silent API.

A Prefect client request to a server that stopped answering waits for its
timeout (60 s by default) and is retried five times with backoff: about 7.5
minutes of silence per call. The progress line must not wait for that, so the
polling happens in :class:`ApiWatch`'s own thread, with short timeouts and no
retries, and the caller reads the latest :class:`ApiSnapshot`, which says how
long the API has been silent. Each request's duration is kept: it is the API
latency a client sees (request, server work, response parsing).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectNotFound
from prefect.settings import (
    PREFECT_API_REQUEST_TIMEOUT,
    PREFECT_API_URL,
    PREFECT_CLIENT_MAX_RETRIES,
    temporary_settings,
)

# A page of runs per request: the API caps one read at PREFECT_API_DEFAULT_LIMIT.
RUNS_PER_REQUEST = 200


class ApiUnresponsive(RuntimeError):
    """The Prefect API did not answer for longer than allowed."""


@dataclass(frozen=True)
class ApiSnapshot:
    """The latest answer of the API and how old it is."""

    runs: list[FlowRun] | None  # None until the first successful poll
    slots: dict[str, int]
    silent_for_s: float  # since the last successful poll (or since watching began)
    last_error: str | None  # the last failed poll's error, cleared by a success


@dataclass(frozen=True)
class LatencySummary:
    """Durations of the watch's API requests, as a client saw them."""

    requests: int
    p50_s: float | None
    p95_s: float | None
    max_s: float | None


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile (``fraction`` in 0..1) of ``values``; ``None`` when empty.

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
        2.0
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summarize_latencies(durations: Sequence[float]) -> LatencySummary:
    """p50, p95 and max of request durations."""
    return LatencySummary(
        len(durations),
        percentile(durations, 0.50),
        percentile(durations, 0.95),
        max(durations) if durations else None,
    )


class ApiWatch:
    """Poll a batch's flow runs and GPU limits every ``poll_s`` in a daemon thread.

    Use as a context manager; :meth:`snapshot` never blocks on the API.

    Example:
        >>> with ApiWatch(api_url, ids, ["gpu:local-1"]) as watch:  # doctest: +SKIP
        ...     print(watch.snapshot().silent_for_s)
    """

    def __init__(
        self,
        api_url: str,
        ids: Sequence[UUID],
        limit_names: Sequence[str],
        poll_s: float = 1.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.api_url = api_url
        self.ids = list(ids)
        self.limit_names = list(limit_names)
        self.poll_s = poll_s
        self.request_timeout_s = request_timeout_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._last_ok: float | None = None
        self._runs: list[FlowRun] | None = None
        self._slots: dict[str, int] = {}
        self._last_error: str | None = None
        self._durations: list[float] = []
        self._thread = threading.Thread(target=self._run, name="pgw-api-watch", daemon=True)

    def __enter__(self) -> ApiWatch:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Ask the thread to stop; it ends after its request in flight, if any.

        Waits at most ``poll_s`` for it: the thread is a daemon, and a request
        to a silent API may take its whole timeout.
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.poll_s)

    def snapshot(self) -> ApiSnapshot:
        """The latest poll's result and how long the API has been silent."""
        with self._lock:
            since = self._last_ok if self._last_ok is not None else self._started
            return ApiSnapshot(
                runs=None if self._runs is None else list(self._runs),
                slots=dict(self._slots),
                silent_for_s=time.monotonic() - since,
                last_error=self._last_error,
            )

    def latency(self) -> LatencySummary:
        """p50 / p95 / max of every request made so far."""
        with self._lock:
            return summarize_latencies(self._durations)

    def _run(self) -> None:
        # Short timeouts and no retries: a silent API shows as silence at once.
        updates = {
            PREFECT_API_URL: self.api_url,
            PREFECT_API_REQUEST_TIMEOUT: self.request_timeout_s,
            PREFECT_CLIENT_MAX_RETRIES: 0,
        }
        with temporary_settings(updates=updates), get_client(sync_client=True) as client:
            while not self._stop.is_set():
                try:
                    runs = self._read_runs(client)
                    slots = self._read_slots(client)
                except Exception as exc:  # any failure is "not answering"; keep polling
                    with self._lock:
                        self._last_error = f"{type(exc).__name__}: {exc}".strip()
                else:
                    with self._lock:
                        self._runs, self._slots = runs, slots
                        self._last_ok = time.monotonic()
                        self._last_error = None
                self._stop.wait(self.poll_s)

    def _timed(self, started: float) -> None:
        with self._lock:
            self._durations.append(time.perf_counter() - started)

    def _read_runs(self, client: SyncPrefectClient) -> list[FlowRun]:
        runs: list[FlowRun] = []
        for offset in range(0, len(self.ids), RUNS_PER_REQUEST):
            page = self.ids[offset : offset + RUNS_PER_REQUEST]
            started = time.perf_counter()
            runs.extend(
                client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page)
                )
            )
            self._timed(started)
        return runs

    def _read_slots(self, client: SyncPrefectClient) -> dict[str, int]:
        held: dict[str, int] = {}
        for name in self.limit_names:
            started = time.perf_counter()
            try:
                held[name] = int(client.read_global_concurrency_limit_by_name(name).active_slots)
            except ObjectNotFound:
                held[name] = 0
            self._timed(started)
        return held
