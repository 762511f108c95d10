"""Worker entrypoint: wait for this worker's limit, then run the Prefect worker and its slot broker.

A worker that polled for flow runs before its limit existed would run GPU steps
that fail closed (or, with a plain ``concurrency()``, run unlimited). So the
entrypoint waits for ``{limit_prefix}:{WORKER_ID}`` to exist and be active, with a
timeout that fails visibly (non-zero exit, the reason on stderr).

Then one process, one event loop, hosts:

- the slot broker (``broker.py``) on a Unix socket in a private directory, whose
  path reaches flow runs through ``PGW_SLOT_BROKER`` (flow-run processes inherit
  the worker's environment, as they inherit ``WORKER_ID``);
- Prefect's process worker, in-process, configured as ``prefect worker start
  --type process --name $WORKER_ID --limit <flow runs> [--with-healthcheck]``
  would configure it (the same class and options, so the same behaviour), whose intake
  follows the GPU: a poll takes new flow runs only while the GPU queue at the
  broker is shorter than the worker's slots (``grants.intake_open``).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prefect_gpu_workers.limits import (
    GpuLimitUnavailable,
    GpuSlotRequest,
    read_limit,
)
from prefect_gpu_workers.naming import SLOT_BROKER_ENV, worker_id_from_env

IntakeMode = Literal["gpu-queue", "flow-runs"]


def wait_for_limit(
    request: GpuSlotRequest,
    timeout_s: float,
    poll_s: float = 2.0,
    report: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> None:
    """Block until ``request`` can be served by its limit; raise the last reason on timeout."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            request.check(read_limit(request.name))
            report(f"limit {request.name} is ready")
            return
        except GpuLimitUnavailable as exc:
            if str(exc) != str(last):
                report(f"waiting for limit: {exc}")
            last = exc
        except Exception as exc:  # Prefect not reachable yet: keep waiting, say so once
            if str(exc) != str(last):
                report(f"waiting for the Prefect API: {exc}")
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"limit {request.name} not ready after {timeout_s:.0f}s; last: {last}"
            )
        time.sleep(poll_s)


def _process_worker_class() -> type[Any]:
    """A Prefect ``ProcessWorker`` whose intake follows its broker's GPU queue."""
    from prefect.workers.process import ProcessWorker

    from prefect_gpu_workers.broker import SlotBroker

    class GpuProcessWorker(ProcessWorker):
        def __init__(
            self,
            *args: Any,
            broker: SlotBroker,
            gpu_limit: str,
            intake: IntakeMode,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self._broker = broker
            self._gpu_limit = gpu_limit
            self._intake: IntakeMode = intake

        async def _submit_scheduled_flow_runs(self, flow_run_response: list[Any]) -> list[Any]:
            if (
                self._intake == "gpu-queue"
                and flow_run_response
                and not self._broker.intake_open(self._gpu_limit)
            ):
                # The GPU queue holds a full round: leave these runs to other workers.
                self._logger.debug(
                    "GPU queue at %s is full: no new flow runs this poll", self._gpu_limit
                )
                return []
            runs: list[Any] = await super()._submit_scheduled_flow_runs(flow_run_response)
            return runs

    return GpuProcessWorker


async def serve_worker(
    pool: str,
    worker_id: str,
    request: GpuSlotRequest,
    flow_runs: int,
    with_healthcheck: bool = False,
    intake: IntakeMode = "gpu-queue",
    socket_path: Path | None = None,
    metrics_socket: Path | None = None,
) -> None:
    """Run the slot broker and the Prefect process worker in this event loop until stopped."""
    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS, PREFECT_WORKER_PREFETCH_SECONDS
    from prefect.utilities.processutils import setup_signal_handlers_worker

    from prefect_gpu_workers.broker import SlotBroker

    async with SlotBroker(worker_id, socket_path) as broker:
        await broker.watch(request.name)
        os.environ[SLOT_BROKER_ENV] = str(broker.socket_path)
        print(f"slot broker for {request.name} on {broker.socket_path}", flush=True)
        metrics_server = None
        if metrics_socket is not None:
            from prefect_gpu_workers.metrics import serve_metrics

            metrics_server = await serve_metrics(metrics_socket, broker.metrics_text)
            print(f"slot broker metrics on {metrics_socket}", flush=True)
        worker = _process_worker_class()(
            name=worker_id,
            work_pool_name=pool,
            limit=flow_runs,
            prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
            heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
            broker=broker,
            gpu_limit=request.name,
            intake=intake,
        )
        # As `prefect worker start` does: SIGTERM becomes SIGINT, a second one SIGKILL.
        setup_signal_handlers_worker(os.getpid(), "the process worker", print)
        try:
            await worker.start(with_healthcheck=with_healthcheck, printer=print)
        finally:
            if metrics_server is not None:
                metrics_server.close()


async def serve_plain_worker(
    pool: str, worker_id: str, flow_runs: int, with_healthcheck: bool = False
) -> None:
    """Prefect's process worker alone: GPU steps poll Prefect (the comparison baseline)."""
    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS, PREFECT_WORKER_PREFETCH_SECONDS
    from prefect.utilities.processutils import setup_signal_handlers_worker
    from prefect.workers.process import ProcessWorker

    os.environ.pop(SLOT_BROKER_ENV, None)
    print("no slot broker: GPU steps poll Prefect", flush=True)
    worker = ProcessWorker(
        name=worker_id,
        work_pool_name=pool,
        limit=flow_runs,
        prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
        heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
    )
    setup_signal_handlers_worker(os.getpid(), "the process worker", print)
    await worker.start(with_healthcheck=with_healthcheck, printer=print)


def run_worker(
    pool: str,
    flow_runs: int,
    limit_prefix: str,
    wait_timeout_s: float,
    with_healthcheck: bool = False,
    intake: IntakeMode = "gpu-queue",
    metrics_socket: Path | None = None,
    slot_broker: bool = True,
) -> None:
    """Wait for the limit, then serve the broker and the Prefect worker until stopped.

    Raises:
        WorkerIdentityError: ``WORKER_ID`` missing or invalid.
        TimeoutError: the limit was not ready within ``wait_timeout_s``.
    """
    worker_id = worker_id_from_env()
    request = GpuSlotRequest.for_worker(1, limit_prefix, worker_id)
    wait_for_limit(request, wait_timeout_s)
    if not slot_broker:
        asyncio.run(serve_plain_worker(pool, worker_id, flow_runs, with_healthcheck))
        return
    asyncio.run(
        serve_worker(
            pool,
            worker_id,
            request,
            flow_runs,
            with_healthcheck,
            intake,
            metrics_socket=metrics_socket,
        )
    )
