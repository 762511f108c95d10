"""The per-worker limit contract, shared by the flows, the local mode and the operator.

One Prefect global concurrency limit per worker, named ``{limit_prefix}:{worker_id}``,
sized to that worker's GPU capacity. Only the GPU step acquires it.

Contract:
- the worker identity comes from ``WORKER_ID``; missing or invalid is an error,
  never a silent default (a wrong identity would name a limit nobody created);
- the GPU step fails closed: a missing limit, an inactive one, or an ``occupy``
  larger than the limit raises :class:`GpuLimitUnavailable` before any work runs;
- the slot is released when the block exits, on success, error or cancellation.

Memory and other limits: ``gpu_slot(memory="20GiB", also={"licence:abaqus": 1})``
asks the broker to place the step on one of the worker's GPUs with 20 GiB
free (held in the worker's memory limit ``<prefix>-memory:<worker>``, whole
GiB rounded up) and to hold one slot of ``licence:abaqus`` with it. The block
gets a :class:`GpuGrant`: ``grant.device`` (``"cuda:1"``) is the GPU it was
placed on, which the step must use (the process's ``CUDA_VISIBLE_DEVICES`` is
left as the worker set it).

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
    gib_held,
    limit_name,
    memory_limit_name,
    parse_memory_mib,
    worker_id_from_env,
)
from prefect_gpu_workers.slots.wire import MAX_LABEL_CHARS, decode, encode

logger = logging.getLogger(__name__)
_fallback_said = False


class GpuLimitUnavailable(RuntimeError):
    """The worker's limit cannot gate the GPU step, so the step must not run."""

    def __init__(self, limit_name: str, problem: str, remedy: str) -> None:
        self.limit_name = limit_name
        super().__init__(f"GPU limit {limit_name!r} {problem}; {remedy}")


class GpuGrant(str):
    """What a GPU step holds: the limit's name (what ``gpu_slot`` yielded before
    memory placement, so ``with gpu_slot() as limit`` reads as it did), with
    where the step was placed.

    Attributes:
        device: the torch device to use: ``cuda:<position>`` of the GPU the
            broker placed a memory request on; ``"cuda"`` (the current device)
            when nothing was placed.
        position: that GPU's position among the process's CUDA devices; None
            when not placed.
        gpu_uuid: its ``GPU-...``/``MIG-...`` UUID where the worker knows it.
        memory_gib: the GiB held for the step (None without ``memory``).
    """

    device: str
    position: int | None
    gpu_uuid: str
    memory_gib: int | None

    def __new__(
        cls,
        limit: str,
        position: int | None = None,
        gpu_uuid: str = "",
        memory_gib: int | None = None,
    ) -> GpuGrant:
        grant = super().__new__(cls, limit)
        grant.position, grant.gpu_uuid, grant.memory_gib = position, gpu_uuid, memory_gib
        grant.device = "cuda" if position is None else f"cuda:{position}"
        return grant


@dataclass(frozen=True)
class GpuSlotRequest:
    """What one GPU step asks for: ``occupy`` slots of one worker's limit, and
    optionally GPU memory (whole GiB, in its memory limit) and other limits."""

    name: str
    occupy: int = 1
    memory_gib: int | None = None
    memory_limit: str | None = None
    also: tuple[tuple[str, int], ...] = ()  # sorted by name: the order they are taken in

    @classmethod
    def for_worker(
        cls,
        occupy: int = 1,
        limit_prefix: str = DEFAULT_LIMIT_PREFIX,
        worker_id: str | None = None,
        memory: str | int | None = None,
        also: dict[str, int] | None = None,
    ) -> GpuSlotRequest:
        """Raises:
        ValueError: ``occupy`` below 1, a memory size that does not parse, or an
            ``also`` entry below 1 slot or naming the worker's own limits.
        """
        if occupy < 1:
            raise ValueError(f"occupy must be at least 1, got {occupy}")
        worker = worker_id or worker_id_from_env()
        name = limit_name(worker, limit_prefix)
        memory_gib = None if memory is None else gib_held(parse_memory_mib(memory))
        memory_limit = None if memory is None else memory_limit_name(worker, limit_prefix)
        extras = tuple(sorted((also or {}).items()))
        for extra, slots in extras:
            if slots < 1 or extra in (name, memory_limit):
                raise ValueError(f"also[{extra!r}] = {slots}: another limit, 1 slot or more")
        return cls(name, occupy, memory_gib, memory_limit, extras)

    @property
    def limits(self) -> list[tuple[str, int]]:
        """Every limit the step holds and how much of each, in the order the broker
        takes them: the memory limit, ``also`` by name, the slot limit last."""
        held = []
        if self.memory_limit is not None and self.memory_gib is not None:
            held.append((self.memory_limit, self.memory_gib))
        return [*held, *self.also, (self.name, self.occupy)]

    def check(self, limit: GlobalConcurrencyLimitResponse | None) -> None:
        """Raise unless ``limit`` (as read from Prefect) can gate this request's slots."""
        check_limit(self.name, self.occupy, limit)


def check_limit(name: str, occupy: int, limit: GlobalConcurrencyLimitResponse | None) -> None:
    """Raise unless ``limit`` (``name`` as read from Prefect) can hold ``occupy``.

    Raises:
        GpuLimitUnavailable: missing, inactive or too small, with the fix.
    """
    if limit is None:
        raise GpuLimitUnavailable(
            name,
            "does not exist",
            f"create it with `prefect gcl create {name} --limit <slots>` "
            "(the operator, `start` and `prefect-gpu-workers demo` create a worker's "
            "limits for you); the GPU step will not run unlimited",
        )
    if not limit.active:
        raise GpuLimitUnavailable(
            name,
            "is inactive",
            f"enable it with `prefect gcl enable {name}`; the GPU step will not run unlimited",
        )
    if occupy > limit.limit:
        raise GpuLimitUnavailable(
            name,
            f"has {limit.limit} slot(s) but this step needs {occupy}",
            f"raise it with `prefect gcl update {name} --limit {occupy}` or ask for less",
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


def check_request(request: GpuSlotRequest) -> None:
    """Check every limit the step will hold, before it waits for any (fails closed)."""
    for name, occupy in request.limits:
        check_limit(name, occupy, read_limit(name))


async def acheck_request(request: GpuSlotRequest) -> None:
    """Async twin of :func:`check_request`."""
    for name, occupy in request.limits:
        check_limit(name, occupy, await aread_limit(name))


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


def _step_labels() -> dict[str, str]:
    """Who asks, for the broker's accounting: the flow's and the task's names, and the
    flow run's deployment id (the broker reads its name once per deployment).

    Outside a run (a script, a test) there are none: the broker counts ``none``.
    """
    from prefect.context import FlowRunContext, TaskRunContext

    labels: dict[str, str] = {}
    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None:
        if flow_ctx.flow is not None:
            labels["flow"] = flow_ctx.flow.name
        if flow_ctx.flow_run is not None and flow_ctx.flow_run.deployment_id is not None:
            labels["deployment_id"] = str(flow_ctx.flow_run.deployment_id)
    task_ctx = TaskRunContext.get()
    if task_ctx is not None:
        labels["task"] = task_ctx.task.name
    # Cut, not refused: a long name must not fail the step (the broker cuts too).
    return {key: value[:MAX_LABEL_CHARS] for key, value in labels.items() if value}


def _acquire_message(request: GpuSlotRequest) -> bytes:
    message: dict[str, Any] = {
        "op": "acquire", "limit": request.name, "occupy": request.occupy,
        "holder": _lease_holder(), "labels": _step_labels(),
    }  # fmt: skip
    if request.memory_gib is not None:
        message["memory_gib"] = request.memory_gib
    if request.also:
        message["also"] = dict(request.also)
    return encode(message)


@dataclass(frozen=True)
class _Granted:
    """The broker's ``granted`` answer: the grant's leases and where it was placed."""

    grant: GpuGrant
    lease_ids: tuple[UUID, ...]


def _granted_lease(request: GpuSlotRequest, message: dict[str, Any]) -> _Granted | None:
    """The grant; ``None`` when the broker failed (the step polls Prefect)."""
    if message.get("event") == "granted":
        ids = message.get("lease_ids") or [message["lease_id"]]
        gpu = message.get("gpu") or {}
        grant = GpuGrant(
            request.name,
            gpu.get("position"),
            str(gpu.get("uuid") or ""),
            request.memory_gib,
        )
        return _Granted(grant, tuple(UUID(str(lease)) for lease in ids))
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

    def __init__(self, sock: socket.socket, lines: BinaryIO, granted: _Granted) -> None:
        self.sock = sock
        self.lines = lines
        self.granted = granted

    def release(self) -> None:
        """Tell the broker (which releases to Prefect first); if it is gone, release here."""
        answered = False
        with contextlib.suppress(OSError):
            self.sock.sendall(encode({"op": "release"}))
            answered = bool(self.lines.readline())
        self.lines.close()
        self.sock.close()
        if not answered:
            # The broker died while the step ran: its leases would otherwise stay
            # counted until they expire.
            with get_client(sync_client=True) as client:
                for lease_id in self.granted.lease_ids:
                    client.release_concurrency_slots_with_lease(lease_id)


def _broker_path() -> str | None:
    """The worker's broker socket; ``None`` (said once) when there is none."""
    path = os.environ.get(SLOT_BROKER_ENV)
    if not path:
        _say_fallback(f"{SLOT_BROKER_ENV} is not set")
    return path or None


def _first_answer(request: GpuSlotRequest, path: str, line: bytes) -> _Granted | None:
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
    granted: _Granted | None = None
    try:
        sock.connect(path)
        sock.sendall(_acquire_message(request))
        sock.settimeout(timeout_seconds)
        granted = _first_answer(request, path, lines.readline())
    except TimeoutError:
        raise _timeout_error(timeout_seconds) from None  # closing drops the request
    except OSError as exc:
        _say_fallback(f"{path}: {exc}")
    finally:
        if granted is None:
            sock.close()
    if granted is None:
        return None
    sock.settimeout(None)
    return _BrokerGrant(sock, lines, granted)


def _unplaced(request: GpuSlotRequest) -> GpuGrant:
    """The grant of a step that polled Prefect: nobody placed it on a GPU."""
    if request.memory_gib is not None:
        _say_fallback("memory requests are not placed on a GPU without it")
    return GpuGrant(request.name, memory_gib=request.memory_gib)


@contextmanager
def _polled(request: GpuSlotRequest, timeout_seconds: float | None) -> Iterator[None]:
    """Every limit of ``request`` through Prefect, one after the other in its order."""
    with contextlib.ExitStack() as stack:
        for name, occupy in request.limits:
            # strict=True covers the limit vanishing between the check and the acquire.
            stack.enter_context(
                sync_concurrency(name, occupy=occupy, timeout_seconds=timeout_seconds, strict=True)
            )
        yield


@contextmanager
def gpu_slot(
    occupy: int = 1,
    *,
    memory: str | int | None = None,
    also: dict[str, int] | None = None,
    limit_prefix: str = DEFAULT_LIMIT_PREFIX,
    worker_id: str | None = None,
    timeout_seconds: float | None = None,
) -> Iterator[GpuGrant]:
    """Hold ``occupy`` slots of this worker's GPU limit for the duration of the block.

    Waits at the worker's slot broker when there is one, else polls Prefect.
    Fails closed (:class:`GpuLimitUnavailable`) when a limit is missing,
    inactive or too small, or the memory fits none of the worker's GPUs.

    Args:
        occupy: slots of ``<prefix>:<worker>``.
        memory: GPU memory the step needs ("20GiB", "20Gi", "20GB"; a bare
            number is GiB): the broker places the step on one GPU with that
            much free and holds it (rounded up to whole GiB) in
            ``<prefix>-memory:<worker>``. Use ``grant.device``.
        also: other global limits held with the grant, ``{name: slots}``,
            taken after the memory limit and before the slot limit, in name
            order (two workers never wait on each other for them), and
            released with it.
        limit_prefix, worker_id: whose limits (default: ``gpu``, ``WORKER_ID``).
        timeout_seconds: give up waiting after this.

    Yields:
        GpuGrant: the limit's name, with ``.device`` (``"cuda:1"``).

    Raises:
        GpuLimitUnavailable: a limit cannot gate the step, or no GPU of the
            worker has the memory (the message gives each GPU's).
        TimeoutError: not granted within ``timeout_seconds``.

    Example:
        >>> with gpu_slot(memory="20GiB") as gpu:  # doctest: +SKIP
        ...     model.to(gpu.device)
    """
    request = GpuSlotRequest.for_worker(occupy, limit_prefix, worker_id, memory, also)
    check_request(request)
    grant = _broker_acquire(request, timeout_seconds)
    if grant is None:
        with _polled(request, timeout_seconds):
            yield _unplaced(request)
        return
    try:
        yield grant.granted.grant
    finally:
        grant.release()


async def _abroker_acquire(
    request: GpuSlotRequest, timeout_seconds: float | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, _Granted] | None:
    """Async twin of :func:`_broker_acquire`: the same answers, read the same way."""
    path = _broker_path()
    if path is None:
        return None
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        _say_fallback(f"{path}: {exc}")
        return None
    granted: _Granted | None = None
    try:
        writer.write(_acquire_message(request))
        await writer.drain()
        async with asyncio.timeout(timeout_seconds):
            granted = _first_answer(request, path, await reader.readline())
    except TimeoutError:
        raise _timeout_error(timeout_seconds) from None  # closing drops the request
    except OSError as exc:
        _say_fallback(f"{path}: {exc}")
    finally:  # also when cancelled while waiting: closing drops the request
        if granted is None:
            writer.close()
    if granted is None:
        return None
    return reader, writer, granted


@asynccontextmanager
async def agpu_slot(
    occupy: int = 1,
    *,
    memory: str | int | None = None,
    also: dict[str, int] | None = None,
    limit_prefix: str = DEFAULT_LIMIT_PREFIX,
    worker_id: str | None = None,
    timeout_seconds: float | None = None,
) -> AsyncIterator[GpuGrant]:
    """Async twin of :func:`gpu_slot`."""
    request = GpuSlotRequest.for_worker(occupy, limit_prefix, worker_id, memory, also)
    await acheck_request(request)
    grant = await _abroker_acquire(request, timeout_seconds)
    if grant is None:
        async with contextlib.AsyncExitStack() as stack:
            for name, slots in request.limits:
                await stack.enter_async_context(
                    async_concurrency(
                        name, occupy=slots, timeout_seconds=timeout_seconds, strict=True
                    )
                )
            yield _unplaced(request)
        return
    reader, writer, granted = grant
    try:
        yield granted.grant
    finally:
        answered = False
        with contextlib.suppress(OSError):
            writer.write(encode({"op": "release"}))
            await writer.drain()
            answered = bool(await reader.readline())
        writer.close()
        if not answered:
            async with get_client() as client:
                for lease_id in granted.lease_ids:
                    await client.release_concurrency_slots_with_lease(lease_id)
