"""The per-worker limit contract, shared by the flows, the local mode and the operator.

One Prefect global concurrency limit per worker, named ``{limit_prefix}:{worker_id}``,
sized to that worker's GPU capacity. Only the GPU step acquires it.

Contract:
- the worker identity comes from ``WORKER_ID``; missing or invalid is an error,
  never a silent default (a wrong identity would name a limit nobody created);
- the GPU step fails closed: a missing limit, an inactive one, or an ``occupy``
  larger than the limit raises :class:`GpuLimitUnavailable` before any work runs;
- the slot is released when the block exits, on success, error or cancellation.

Where the step waits: at its worker's slot broker (``PGW_SLOT_BROKER``, a Unix
socket; see ``broker.py``), which grants slots FIFO the moment they free up and
holds the Prefect lease for the step. With no broker reachable (the variable is
unset, e.g. a flow run outside a ``prefect-gpu-workers worker``, or its socket is
dead) the step polls Prefect itself, as a plain ``concurrency()`` does, and says
so once per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError
from prefect.concurrency.asyncio import concurrency as async_concurrency
from prefect.concurrency.sync import concurrency as sync_concurrency
from prefect.exceptions import ObjectNotFound

from prefect_gpu_workers.naming import (
    DEFAULT_LIMIT_PREFIX,
    SLOT_BROKER_ENV,
    limit_name,
    worker_id_from_env,
)
from prefect_gpu_workers.slots.wire import decode, encode

logger = logging.getLogger(__name__)
_fallback_said = False


class GpuLimitUnavailable(RuntimeError):
    """The worker's limit cannot gate the GPU step, so the step must not run."""

    def __init__(self, limit_name: str, problem: str, remedy: str) -> None:
        self.limit_name = limit_name
        super().__init__(f"GPU limit {limit_name!r} {problem}; {remedy}")


@dataclass(frozen=True)
class GpuSlotRequest:
    """What one GPU step asks for: ``occupy`` slots of one worker's limit."""

    name: str
    occupy: int = 1

    @classmethod
    def for_worker(
        cls,
        occupy: int = 1,
        limit_prefix: str = DEFAULT_LIMIT_PREFIX,
        worker_id: str | None = None,
    ) -> GpuSlotRequest:
        if occupy < 1:
            raise ValueError(f"occupy must be at least 1, got {occupy}")
        return cls(limit_name(worker_id or worker_id_from_env(), limit_prefix), occupy)

    def check(self, limit: GlobalConcurrencyLimitResponse | None) -> None:
        """Raise unless ``limit`` (as read from Prefect) can gate this request."""
        if limit is None:
            raise GpuLimitUnavailable(
                self.name,
                "does not exist",
                f"create it with `prefect gcl create {self.name} --limit <slots>` "
                "(the operator and `prefect-gpu-workers demo` create it for you); "
                "the GPU step will not run unlimited",
            )
        if not limit.active:
            raise GpuLimitUnavailable(
                self.name,
                "is inactive",
                f"enable it with `prefect gcl enable {self.name}`; "
                "the GPU step will not run unlimited",
            )
        if self.occupy > limit.limit:
            raise GpuLimitUnavailable(
                self.name,
                f"has {limit.limit} slot(s) but this step needs {self.occupy}",
                f"raise it with `prefect gcl update {self.name} --limit {self.occupy}` "
                "or lower occupy",
            )


def read_limit(name: str) -> GlobalConcurrencyLimitResponse | None:
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None


async def aread_limit(name: str) -> GlobalConcurrencyLimitResponse | None:
    async with get_client() as client:
        try:
            return await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None


def _say_fallback(reason: str) -> None:
    """Log, once per process (a flow run is one process), that steps poll Prefect."""
    global _fallback_said
    if _fallback_said:
        return
    _fallback_said = True
    message = f"no slot broker ({reason}): GPU steps wait by polling Prefect"
    try:
        from prefect.logging import get_run_logger

        get_run_logger().warning(message)
    except Exception:
        logger.warning(message)


def _lease_holder() -> dict[str, str] | None:
    """The task run (else flow run) the lease is for, so Prefect's UI shows who holds it."""
    from prefect.context import FlowRunContext, TaskRunContext

    task_ctx = TaskRunContext.get()
    if task_ctx is not None:
        return {"type": "task_run", "id": str(task_ctx.task_run.id)}
    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        return {"type": "flow_run", "id": str(flow_ctx.flow_run.id)}
    return None


def _acquire_message(request: GpuSlotRequest) -> bytes:
    return encode(
        {"op": "acquire", "limit": request.name, "occupy": request.occupy,
         "holder": _lease_holder()}
    )  # fmt: skip


def _granted_lease(request: GpuSlotRequest, message: dict[str, Any]) -> UUID | None:
    """The granted lease; ``None`` when the broker failed (the step polls Prefect)."""
    if message.get("event") == "granted":
        return UUID(str(message["lease_id"]))
    if message.get("event") == "error" and message.get("kind") == "limit_unusable":
        raise GpuLimitUnavailable(
            request.name, str(message.get("message")), "see `prefect gcl inspect`"
        )
    _say_fallback(f"the broker answered {message!r}")
    return None


def _timeout_error(timeout_seconds: float | None) -> AcquireConcurrencySlotTimeoutError:
    return AcquireConcurrencySlotTimeoutError(
        f"Attempt to acquire GPU slots timed out after {timeout_seconds} second(s)"
    )


class _BrokerGrant:
    """A granted slot held through an open connection to the broker (blocking)."""

    def __init__(self, sock: socket.socket, lines: BinaryIO, lease_id: UUID) -> None:
        self.sock = sock
        self.lines = lines
        self.lease_id = lease_id

    def release(self) -> None:
        """Tell the broker (which releases to Prefect first); if it is gone, release here."""
        answered = False
        with contextlib.suppress(OSError):
            self.sock.sendall(encode({"op": "release"}))
            answered = bool(self.lines.readline())
        self.lines.close()
        self.sock.close()
        if not answered:
            # The broker died while the step ran: its lease would otherwise stay
            # counted until it expires.
            with get_client(sync_client=True) as client:
                client.release_concurrency_slots_with_lease(self.lease_id)


def _broker_path() -> str | None:
    """The worker's broker socket; ``None`` (said once) when there is none."""
    path = os.environ.get(SLOT_BROKER_ENV)
    if not path:
        _say_fallback(f"{SLOT_BROKER_ENV} is not set")
    return path or None


def _first_answer(request: GpuSlotRequest, path: str, line: bytes) -> UUID | None:
    """The broker's first answer read: the granted lease, or ``None`` (said once):
    poll Prefect instead.

    Raises:
        GpuLimitUnavailable: the broker says the limit cannot gate the step.
    """
    if not line:
        _say_fallback(f"{path} closed the connection")
        return None
    return _granted_lease(request, decode(line))


def _broker_acquire(request: GpuSlotRequest, timeout_seconds: float | None) -> _BrokerGrant | None:
    """Wait at the broker; ``None`` means: no broker, poll Prefect instead."""
    path = _broker_path()
    if path is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lines = sock.makefile("rb")
    lease_id: UUID | None = None
    try:
        sock.connect(path)
        sock.sendall(_acquire_message(request))
        sock.settimeout(timeout_seconds)
        lease_id = _first_answer(request, path, lines.readline())
    except TimeoutError:
        raise _timeout_error(timeout_seconds) from None  # closing drops the request
    except OSError as exc:
        _say_fallback(f"{path}: {exc}")
    finally:
        if lease_id is None:
            sock.close()
    if lease_id is None:
        return None
    sock.settimeout(None)
    return _BrokerGrant(sock, lines, lease_id)


@contextmanager
def gpu_slot(
    occupy: int = 1,
    *,
    limit_prefix: str = DEFAULT_LIMIT_PREFIX,
    worker_id: str | None = None,
    timeout_seconds: float | None = None,
) -> Iterator[str]:
    """Hold ``occupy`` slots of this worker's GPU limit for the duration of the block.

    Waits at the worker's slot broker when there is one, else polls Prefect.
    Fails closed (:class:`GpuLimitUnavailable`) when the limit is missing,
    inactive or too small. Yields the limit name.

    Raises:
        GpuLimitUnavailable: the limit cannot gate the step.
        TimeoutError: not granted within ``timeout_seconds``.

    Example:
        >>> with gpu_slot(worker_id="worker-0"):  # doctest: +SKIP
        ...     run_model()
    """
    request = GpuSlotRequest.for_worker(occupy, limit_prefix, worker_id)
    request.check(read_limit(request.name))
    grant = _broker_acquire(request, timeout_seconds)
    if grant is None:
        # strict=True covers the limit vanishing between the check and the acquire.
        with sync_concurrency(
            request.name, occupy=request.occupy, timeout_seconds=timeout_seconds, strict=True
        ):
            yield request.name
        return
    try:
        yield request.name
    finally:
        grant.release()


async def _abroker_acquire(
    request: GpuSlotRequest, timeout_seconds: float | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, UUID] | None:
    """Async twin of :func:`_broker_acquire`: the same answers, read the same way."""
    path = _broker_path()
    if path is None:
        return None
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        _say_fallback(f"{path}: {exc}")
        return None
    lease_id: UUID | None = None
    try:
        writer.write(_acquire_message(request))
        await writer.drain()
        async with asyncio.timeout(timeout_seconds):
            lease_id = _first_answer(request, path, await reader.readline())
    except TimeoutError:
        raise _timeout_error(timeout_seconds) from None  # closing drops the request
    except OSError as exc:
        _say_fallback(f"{path}: {exc}")
    finally:  # also when cancelled while waiting: closing drops the request
        if lease_id is None:
            writer.close()
    if lease_id is None:
        return None
    return reader, writer, lease_id


@asynccontextmanager
async def agpu_slot(
    occupy: int = 1,
    *,
    limit_prefix: str = DEFAULT_LIMIT_PREFIX,
    worker_id: str | None = None,
    timeout_seconds: float | None = None,
) -> AsyncIterator[str]:
    """Async twin of :func:`gpu_slot`."""
    request = GpuSlotRequest.for_worker(occupy, limit_prefix, worker_id)
    request.check(await aread_limit(request.name))
    grant = await _abroker_acquire(request, timeout_seconds)
    if grant is None:
        async with async_concurrency(
            request.name, occupy=request.occupy, timeout_seconds=timeout_seconds, strict=True
        ):
            yield request.name
        return
    reader, writer, lease_id = grant
    try:
        yield request.name
    finally:
        answered = False
        with contextlib.suppress(OSError):
            writer.write(encode({"op": "release"}))
            await writer.drain()
            answered = bool(await reader.readline())
        writer.close()
        if not answered:
            async with get_client() as client:
                await client.release_concurrency_slots_with_lease(lease_id)
