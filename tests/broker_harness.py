"""Helpers for the slot broker's tests: a broker on its own event-loop thread, holder
processes, Prefect reads, and waiting on conditions (never on time)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_gpu_workers.naming import SLOT_BROKER_ENV, WORKER_ID_ENV
from prefect_gpu_workers.slots.broker import SlotBroker
from prefect_gpu_workers.slots.wire import decode, encode

HOLDER_SCRIPT = Path(__file__).parent / "integration" / "slot_holder.py"


def unique_worker() -> str:
    return f"w-{uuid.uuid4().hex[:8]}"


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> float:
    """Poll ``condition`` every 20 ms; return the seconds it took. The timeout only
    turns a hang into a failure that names what never happened."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def create_limit(name: str, limit: int, api_url: str | None = None) -> None:
    with _settings(api_url), get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


def active_slots(name: str, api_url: str | None = None) -> int:
    with _settings(api_url), get_client(sync_client=True) as client:
        return int(client.read_global_concurrency_limit_by_name(name).active_slots)


def _settings(api_url: str | None) -> contextlib.AbstractContextManager[Any]:
    if api_url is None:
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_API_URL: api_url})


def start_thread(target: Callable[..., object], *args: object) -> threading.Thread:
    """A started thread that sees this thread's Prefect settings (context variables)."""
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(target, *args), daemon=True)
    thread.start()
    return thread


class BrokerThread:
    """A :class:`SlotBroker` served by an event loop on a thread of the test process."""

    def __init__(self, worker_id: str, api_url: str | None = None, **options: Any) -> None:
        self.worker_id = worker_id
        self.api_url = api_url
        self.options = options
        self.broker: SlotBroker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # The caller's Prefect settings (API URL) live in context variables.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), daemon=True)

    @property
    def socket_path(self) -> str:
        assert self.broker is not None
        return str(self.broker.socket_path)

    def _run(self) -> None:
        async def main() -> None:
            with _settings(self.api_url):
                self.broker = SlotBroker(self.worker_id, **self.options)
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                async with self.broker:
                    self._ready.set()
                    await self._stop.wait()

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def __enter__(self) -> BrokerThread:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def serve_metrics_http(self) -> int:
        """Serve the broker's metrics over HTTP on 127.0.0.1 (a free port) until exit; the port."""
        from prefect_gpu_workers.slots.metrics import serve_metrics_http

        assert self.broker is not None
        assert self._loop is not None
        server = asyncio.run_coroutine_threadsafe(
            serve_metrics_http(0, self.broker.metrics_text, host="127.0.0.1"), self._loop
        ).result(30)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def describe(self) -> dict[str, Any]:
        """What the ``stats`` op answers: limits, holders and counters since start."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(self.socket_path)
            sock.sendall(encode({"op": "stats"}))
            return decode(sock.makefile("rb").readline())

    def stats(self, limit: str) -> dict[str, int]:
        """Capacity, held slots and waiters of ``limit``, asked over the socket."""
        limits: dict[str, dict[str, int]] = self.describe()["limits"]
        return limits.get(limit, {"capacity": 0, "held": 0, "waiters": 0, "waiting_slots": 0})

    def waiters(self, limit: str) -> int:
        return self.stats(limit)["waiters"]


class HolderProcess:
    """``slot_holder.py``: takes a GPU slot in its own process, holds it until told."""

    def __init__(
        self,
        worker_id: str,
        env: Mapping[str, str],
        occupy: int = 1,
        memory: str = "",
        also: Mapping[str, int] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HOLDER_SCRIPT), str(occupy), memory, json.dumps(also or {})],
            env={**os.environ, **env, WORKER_ID_ENV: worker_id},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def wait_held(self) -> str:
        """Wait until it holds; return the device it was given."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("held"), f"holder said {line!r} (exit {self.proc.poll()})"
        return line.split()[1]

    def release(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("release\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("released"), f"holder said {line!r}"
        assert self.proc.wait(60) == 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def broker_env(broker: BrokerThread, api_url: str) -> dict[str, str]:
    return {SLOT_BROKER_ENV: broker.socket_path, "PREFECT_API_URL": api_url}
