"""The slot broker: a worker's local authority over its GPU slots, on a Unix socket.

Every contender for ``gpu:<worker>`` is a flow run of that worker, so the worker
process hands its slots over locally and push-based instead of letting each GPU
step poll Prefect and sleep a server-chosen Retry-After. The Prefect limit stays
the record everyone sees (UI, CLI, operator) and the guard nothing exceeds: the
broker takes a Prefect lease for every grant, and a plain ``concurrency()`` call
from someone else's flow is still counted by Prefect alone.

One connection per GPU step; the connection's lifetime is the grant's:

1. the step connects and asks for ``occupy`` slots of its limit;
2. the broker queues it (:class:`~prefect_gpu_workers.slots.grants.GrantQueue`: FIFO,
   never past a waiting head), and when its turn comes takes a lease of the
   Prefect limit on its behalf (strict: a missing limit is an error), which
   succeeds at once unless a holder outside the broker holds slots (then the
   broker polls Prefect for that one waiter);
3. it answers ``granted``; the step runs;
4. the step says ``release`` or its connection drops (exit, crash, SIGKILL): the
   broker gives the lease back to Prefect, then grants the next waiter.

Why the broker, not the step, holds the lease: a step killed between Prefect's
grant and any report of its lease id would leak the slot for the lease's 300 s;
a server restart that forgets leases would make the step's own renewal fail and,
with ``strict``, cancel a healthy GPU step; and one process that knows every lease
of its limit is what lets it repair the count after such a restart.

Repair rule (leases lost in a server restart): the limit's ``active_slots`` live in
the database and survive a restart; only the leases are forgotten, so releasing
one is a silent no-op. Before each release the broker renews the lease (a probe):
a 410 for a lease it renewed within its duration means the server lost it, and the
broker decrements the limit by exactly that holder's slots. It never decrements
slots it did not grant, so a plain ``concurrency()`` holder is never uncounted and
nothing can run past the limit; the flip side is that a plain holder whose lease
was lost keeps its slot counted after it exits, as in Prefect today (use the file
system lease storage for servers that restart). A limit deleted and recreated
while slots are held is re-counted: the broker takes fresh leases on the new limit
for its live holders.

Memory and other limits: a step may ask for GPU memory (``memory_gib``); the
queue places it on one of the worker's GPUs with room (``grants``) and the
grant names that GPU. The broker then holds, beside the slot lease, a lease of
the worker's memory limit ``<prefix>-memory:<worker>`` for the step's GiB, and
one of each ``also`` limit. They are taken one after the other in one order:
the memory limit, the ``also`` limits by name, the slot's last. Brokers taking
the same global limits in name order never wait on each other in a circle,
and the slot's lease taken last is refused by Prefect if the limit shrank
while the others were awaited (taken first, it would let the step start past
the smaller limit). Each is a companion holder with its own lease, renewed,
re-counted and given back exactly as the slot lease is; a grant with
companions never passes its leases on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder

from prefect_gpu_workers.naming import FLOW_RUN_ID_ENV, MEMORY_LIMIT_SUFFIX, parse_limit_name
from prefect_gpu_workers.procfs import env_value
from prefect_gpu_workers.slots.accounting import GpuAccounting, StepLabels
from prefect_gpu_workers.slots.give_back import GiveBacks
from prefect_gpu_workers.slots.grants import (
    GrantQueue,
    Refusal,
    Unserviceable,
    WorkerGpu,
    admission,
    intake_open,
)
from prefect_gpu_workers.slots.holders import BrokerStats, Holder, LimitSlots, Phase
from prefect_gpu_workers.slots.leases import (
    Lease,
    LeaseHold,
)
from prefect_gpu_workers.slots.metrics import render
from prefect_gpu_workers.slots.prefect_io import (
    DeploymentNames,
    LimitInfo,
    LimitUnusable,
    PrefectSlots,
    transient,
)
from prefect_gpu_workers.slots.upkeep import Upkeep
from prefect_gpu_workers.slots.wire import AcquireRequest, decode, encode, parse_acquire

logger = logging.getLogger(__name__)


SOCKET_NAME = "slots.sock"


# A connection must say what it wants this soon: one that says nothing holds a
# descriptor (a step sends its request as soon as it connects).
FIRST_MESSAGE_S = 10.0


# Connections served at once; one per GPU step waiting or running on this worker,
# and a worker runs tens of flow runs at most.
MAX_CONNECTIONS = 512


class BrokerBusy(Exception):
    """The broker serves :data:`MAX_CONNECTIONS` connections already."""


class Abandoned(Exception):
    """The step left while the broker was still taking its grant's leases."""


class Refused(Exception):
    """The request may not queue here (:func:`grants.admission`)."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


def _peer_pid(writer: asyncio.StreamWriter) -> int | None:
    """The connecting process's pid (Linux ``SO_PEERCRED``); ``None`` elsewhere."""
    sock = writer.get_extra_info("socket")
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return None
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, 12))
    except OSError:
        return None
    return int(pid)


def _holder_is_run(holder: ConcurrencyLeaseHolder | None, run_id: str) -> bool:
    """Whether a step's own lease label may stand: its task run (a label only, which
    the broker cannot check), or its flow run itself."""
    if holder is None:
        return False
    return holder.type == "task_run" or str(holder.id) == run_id


class SlotBroker:
    """Serve ``worker_id``'s limits on a Unix socket; see the module docstring.

    Args:
        worker_id: only limits ``<prefix>:<worker_id>`` are served.
        socket_path: where to listen; default: ``slots.sock`` in a new private
            directory (mode 0700) removed on close.
        lease_duration: seconds of each Prefect lease (renewed by the broker).
        busy_poll_s: longest sleep between Prefect attempts for a granted waiter
            while a holder outside the broker holds slots.
        maintenance_s: how often renewals and give-backs are looked after.
        limit_refresh_s: how often each limit is re-read (a resize or a
            recreated limit is noticed within this). A read per limit per
            worker: every two seconds, a thousand workers would send Prefect
            five hundred reads a second to learn that nothing changed.
        clock: monotonic seconds (the simulation's virtual clock in
            ``tests/slot_simulation``).
        request_timeout_s: the longest the broker waits for one Prefect answer
            (the client's default is a minute: one lost answer would hold every
            renewal and grant behind it that long).
        httpx_settings: passed to Prefect's client (the simulation puts its
            model of Prefect there as the transport).
        gpus: the worker's GPUs, in the order its steps address them, for
            memory requests; a GPU of unknown memory gets an even share of the
            memory limit. Default: one GPU of unknown memory.
    """

    def __init__(
        self,
        worker_id: str,
        socket_path: Path | None = None,
        *,
        lease_duration: float = 300.0,
        busy_poll_s: float = 0.5,
        maintenance_s: float = 2.0,
        limit_refresh_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        request_timeout_s: float = 10.0,
        httpx_settings: dict[str, Any] | None = None,
        gpus: tuple[WorkerGpu, ...] = (WorkerGpu(0),),
    ) -> None:
        self.worker_id = worker_id
        self.gpus = gpus
        self._httpx_settings = {
            "timeout": httpx.Timeout(request_timeout_s),
            **(httpx_settings or {}),
        }
        self._own_dir: Path | None = None
        if socket_path is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="pgw-broker-"))
            socket_path = self._own_dir / SOCKET_NAME
        self.socket_path = socket_path
        self.lease_duration = lease_duration
        self.busy_poll_s = busy_poll_s
        self.clock = clock
        self.stats = BrokerStats()
        # Per (limit, deployment, flow, task): steps, waits, slot-seconds held;
        # the worker feeds it NVML readings (busy, memory) where it has them.
        self.accounting = GpuAccounting()
        self._deployments = DeploymentNames(lambda: self.prefect)
        self._limits: dict[str, LimitSlots] = {}
        self._holders: dict[int, Holder] = {}
        self._tickets = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._give_backs = GiveBacks(lambda: self.prefect, self.clock, self.stats)
        self.upkeep = Upkeep(
            self._limits,
            self._holders,
            lambda: self.prefect,
            self.clock,
            self._dispatch,
            self._spawn,
            lease_duration,
            maintenance_s,
            limit_refresh_s,
        )
        self._client_cm: Any = None
        self._prefect: PrefectSlots | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._upkeep: asyncio.Task[Any] | None = None
        # Called after each grant round (a GPU queue may have shrunk): the worker
        # hosting this broker reopens its intake then, not at its next poll.
        self.on_dispatch: Callable[[], None] | None = None
        # The flow runs the hosting worker executes: only their processes are
        # served (grants.admission). None: a broker alone serves any process.
        self.runs_in_flight: Callable[[], AbstractSet[str]] | None = None

    # -- life cycle -------------------------------------------------------------
    async def start(self, listen: bool = True) -> SlotBroker:
        """Connect to Prefect, start the upkeep and (``listen``) serve the socket.

        Without ``listen`` connections come only through :meth:`serve_connection`
        (the simulation's in-memory ones).
        """
        self._client_cm = get_client(httpx_settings=self._httpx_settings)
        client = await self._client_cm.__aenter__()
        self._prefect = PrefectSlots(client, self.lease_duration, self.busy_poll_s, self.clock)
        self._upkeep = self._spawn(self.upkeep.run())
        if not listen:
            return self
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        # The socket is created 0600 (umask) and chmod-ed again: only this user's
        # flow runs may take slots.
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self.serve_connection, path=str(self.socket_path)
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        logger.info("slot broker for %s listening on %s", self.worker_id, self.socket_path)
        return self

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop serving and drop every connection; wait up to ``timeout_s`` for their handlers.

        Waiting steps see the connection close and fall back to polling Prefect.
        Steps that hold a slot keep their lease: giving it back while they run
        would let another step in beside them; each releases its own lease
        through Prefect when it finishes and finds the broker gone.
        """
        self._closing = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._connections):
            writer.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=timeout_s)
        if self._upkeep is not None:
            self._upkeep.cancel()
        if self._background:  # give-backs in flight finish, unless the server is away
            await asyncio.wait(set(self._background), timeout=max(deadline - loop.time(), 0.1))
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._holders.clear()
        if self._client_cm is not None:
            await self._client_cm.__aexit__(None, None, None)
            self._client_cm = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    async def __aenter__(self) -> SlotBroker:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @property
    def prefect(self) -> PrefectSlots:
        if self._prefect is None:
            raise RuntimeError("the broker is not started")
        return self._prefect

    # -- what the worker asks ---------------------------------------------------
    async def watch(self, limit: str) -> None:
        """Read ``limit`` now (its capacity feeds intake before the first step asks).

        Raises:
            LimitUnusable: missing or inactive.
        """
        await self._limit_slots(limit, attempts=10)

    async def settled(self, timeout_s: float) -> bool:
        """Wait until no step holds a slot here (a drained worker's runs are gone).

        Returns whether that happened within ``timeout_s``; the give-backs still
        in flight then finish in :meth:`close`.
        """
        deadline = self.clock() + timeout_s
        # Holders leave from several paths (_finish, close); a short poll is simpler
        # than an event each of them must remember to set.
        while self._holders and self.clock() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return not self._holders

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per limit: capacity, slots held, waiters and the slots they ask for."""
        return {
            name: {
                "capacity": slots.info.limit if slots.companion else slots.queue.capacity,
                "held": self._companion_held(name) if slots.companion else slots.queue.held_slots,
                "waiters": slots.queue.waiters,
                "waiting_slots": slots.queue.waiting_slots,
            }
            for name, slots in self._limits.items()
        }

    def _companion_held(self, name: str) -> int:
        return sum(h.occupy for h in self._holders.values() if h.limit == name and h.lease)

    def placements(self) -> list[dict[str, Any]]:
        """Per GPU of this worker: its memory and the GiB placed on it now."""
        placed: dict[int, int] = {}
        for slots in self._limits.values():
            for position, used in enumerate(slots.queue.gpu_used):
                placed[position] = placed.get(position, 0) + used
        return [
            {"position": gpu.position, "uuid": gpu.uuid, "memory_gib": gpu.memory_gib,
             "placed_gib": placed.get(gpu.position, 0)}
            for gpu in self.gpus
        ]  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """The snapshot plus counters since start (what the ``stats`` op answers)."""
        return {
            "limits": self.snapshot(),
            "gpus": self.placements(),
            "holders": [
                {
                    "limit": h.limit,
                    "occupy": h.occupy,
                    "pid": h.pid,
                    "lease_lost": h.hold in (LeaseHold.LOST, LeaseHold.DECREMENT_SENT),
                }
                for h in self._holders.values()
                if h.phase is Phase.ANNOUNCED
            ],
            "handoffs": self.stats.handoff_seconds.count,
            "handoff_seconds_sum": round(self.stats.handoff_seconds.total, 6),
            "grants": self.stats.grants,
            "reclaimed_on_disconnect": self.stats.reclaimed_on_disconnect,
            "lost_leases_repaired": self.stats.lost_leases_repaired,
            "leases_passed": self.stats.leases_passed,
            "give_backs_in_flight": self._give_backs.in_flight,
        }

    def metrics_text(self) -> str:
        """Prometheus exposition text (see ``slots/metrics.py``)."""
        accounting = self.accounting
        return render(
            self.snapshot(),
            {
                "grants": self.stats.grants,
                "reclaimed": self.stats.reclaimed_on_disconnect,
                "lost_leases_repaired": self.stats.lost_leases_repaired,
            },
            {
                "wait_seconds": self.stats.wait_seconds,
                "handoff_seconds": self.stats.handoff_seconds,
            },
            self.worker_id,
            usage=accounting.usage(self.clock()),
            measured=accounting.measured,
            readings=accounting.readings,
            active={name: slots.info.active_slots for name, slots in self._limits.items()},
        )

    async def step_labels(self, labels: dict[str, str]) -> StepLabels:
        """The accounting labels of a request's ``labels`` (wire.py): a deployment id
        becomes its deployment's name (one Prefect read per id, kept)."""
        deployment = labels.get("deployment")
        deployment_id = labels.get("deployment_id")
        if not deployment and deployment_id:
            deployment = await self._deployments.name(UUID(deployment_id))
        return StepLabels.of(deployment, labels.get("flow"), labels.get("task"))

    def intake_open(self, limit: str) -> bool:
        """Whether the worker takes new flow runs now (see :func:`grants.intake_open`)."""
        slots = self._limits.get(limit)
        return slots is None or intake_open(slots.queue.capacity, slots.queue.waiting_slots)

    # -- one connection ---------------------------------------------------------
    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one connection (the socket's, or an in-memory one) until it ends."""
        ticket = next(self._tickets)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            if len(self._connections) >= MAX_CONNECTIONS:
                # Each connection holds a descriptor; the broker's own Prefect calls
                # (its renewals among them) need some too.
                raise BrokerBusy(f"the broker serves {MAX_CONNECTIONS} connections at most")
            self._connections.add(writer)
            try:
                async with asyncio.timeout(FIRST_MESSAGE_S):
                    line = await reader.readline()
            except TimeoutError:
                raise ValueError(f"no request within {FIRST_MESSAGE_S:g} s") from None
            request = decode(line)
            if request.get("op") == "stats":
                writer.write(encode({"event": "stats", **self.describe()}))
                await writer.drain()
                return
            if request.get("op") != "acquire":
                raise ValueError(f"unknown op {request.get('op')!r}")
            await self._hold(ticket, request, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:
            if isinstance(exc, BrokerBusy):
                kind = "busy"
            elif isinstance(exc, Refused):
                kind = exc.refusal.value
            elif isinstance(exc, LimitUnusable | Unserviceable):
                kind = "limit_unusable"
            elif isinstance(exc, ValueError):
                kind = "bad_request"
            else:  # the step falls back to polling Prefect; say why here
                kind = "broker"
                logger.exception("slot broker: request failed")
            with contextlib.suppress(ConnectionError):
                writer.write(encode({"event": "error", "kind": kind, "message": str(exc)}))
                await writer.drain()
        finally:
            self._connections.discard(writer)
            if handler is not None:
                self._handlers.discard(handler)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _limit_slots(self, name: str, attempts: int | None = None) -> LimitSlots:
        """The limit's queue, reading the limit first if it is new here.

        The read holds no lock: a slow answer for one limit must not hold up the
        requests for every other. Two first requests may both read; the first
        queue stored wins. A step's request retries a server that cannot answer
        (a restart) for as long as the step waits: it would fail the same way
        polling Prefect itself; ``attempts`` bounds it for the worker's own read.

        Raises:
            ValueError: not a limit of this worker.
            LimitUnusable: missing or inactive.
        """
        parsed = parse_limit_name(name)
        if parsed is None or parsed[1] != self.worker_id:
            raise ValueError(f"{name!r} is not a limit of worker {self.worker_id!r}")
        slots = self._limits.get(name)
        if slots is None:
            slots = await self._read_slots(name, attempts, companion=False)
        if slots.companion:
            raise ValueError(f"{name!r} is held alongside GPU grants here, not queued for")
        return slots

    async def _companion_slots(self, name: str) -> LimitSlots:
        """A limit held with a grant (the memory limit, an ``also`` limit), read if new.

        Raises:
            ValueError: it is one of this worker's queued limits.
            LimitUnusable: missing or inactive.
        """
        slots = self._limits.get(name)
        if slots is None:
            slots = await self._read_slots(name, None, companion=True)
        if not slots.companion:
            raise ValueError(f"{name!r} is a limit steps queue for here, not one held beside")
        return slots

    async def _read_slots(self, name: str, attempts: int | None, companion: bool) -> LimitSlots:
        info = await self._read_limit_patiently(name, attempts)
        if info is None or not info.active:
            raise LimitUnusable(f"limit {name!r} is missing or inactive")
        queue = GrantQueue(max(info.limit, 1))
        return self._limits.setdefault(name, LimitSlots(name, info, queue, companion=companion))

    async def _placing(self, slots: LimitSlots) -> LimitSlots:
        """The memory limit of ``slots``' worker, its GPUs set on ``slots``' queue.

        GPUs of unknown memory share the memory limit evenly (the operator sized
        it from the node's label); a resized limit is seen here at the next
        memory request after the broker's next read of it.

        Raises:
            LimitUnusable: the memory limit is missing or inactive.
        """
        prefix, worker = parse_limit_name(slots.name) or ("", "")
        memory = await self._companion_slots(f"{prefix}{MEMORY_LIMIT_SUFFIX}:{worker}")
        share = memory.info.limit // max(len(self.gpus), 1)
        gpus = tuple(share if g.memory_gib is None else g.memory_gib for g in self.gpus)
        if gpus != slots.queue.gpus:
            for ticket in slots.queue.set_gpus(gpus):
                self._holders[ticket].refuse(f"GPU memory of {slots.name} shrank to {gpus} GiB")
        return memory

    async def _read_limit_patiently(self, name: str, attempts: int | None) -> LimitInfo | None:
        for attempt in itertools.count(1):
            try:
                return await self.prefect.read_limit(name)
            except Exception as exc:
                if not transient(exc) or attempt == attempts:
                    raise
                await asyncio.sleep(min(0.25 * attempt, 2.0))
        raise AssertionError("unreachable")

    async def _hold(
        self,
        ticket: int,
        request: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        acquire = parse_acquire(request)  # ValueError: answered as a bad request
        occupy = acquire.occupy
        slots = await self._limit_slots(acquire.limit)
        companion_limits = await self._companion_limits(acquire, slots)
        # Before admission: nothing awaited between admission and the queue (the
        # run cap counts what is queued).
        labels = await self.step_labels(acquire.labels)
        holder_info = None
        if acquire.holder is not None:
            # The holder only labels the lease in Prefect's UI: a shape Prefect
            # does not know leaves it unlabelled rather than refusing the step.
            with contextlib.suppress(ValueError):
                holder_info = ConcurrencyLeaseHolder.model_validate(acquire.holder)
        pid = _peer_pid(writer)
        run_id = env_value(pid, FLOW_RUN_ID_ENV) if pid is not None else None
        self._admit(pid, run_id, slots, occupy)
        if run_id is not None and not _holder_is_run(holder_info, run_id):
            # A flow run's lease is labelled with that run, not what its step says.
            with contextlib.suppress(ValueError):
                holder_info = ConcurrencyLeaseHolder(type="flow_run", id=UUID(run_id))
        slots.queue.request(ticket, occupy, acquire.memory_gib)
        holder = Holder(ticket, slots.name, occupy, holder_info, self.clock(), labels=labels)
        holder.companions = tuple(
            Holder(next(self._tickets), name, slots_asked, holder_info, holder.queued_at)
            for name, slots_asked in companion_limits
        )
        for member in holder.group:
            member.pid, member.run_id = pid, run_id
            self._holders[member.ticket] = member
        # Anything the client sends or its disconnection ends the wait or the grant.
        client_done = asyncio.ensure_future(reader.readline())
        try:
            self._dispatch(slots)
            decided = asyncio.ensure_future(holder.decided.wait())
            await asyncio.wait({decided, client_done}, return_when=asyncio.FIRST_COMPLETED)
            decided.cancel()
            if holder.phase is Phase.REFUSED:
                raise LimitUnusable(holder.refusal)
            if holder.phase is not Phase.GRANTED or client_done.done():
                return  # gave up while waiting (cancelled, timed out, died), or closing
            # Granted locally: the Prefect lease is taken to completion even if the
            # client leaves meanwhile (an abandoned increment would leak a slot).
            acquiring = asyncio.ensure_future(self._acquire(holder, slots))
            await asyncio.wait({acquiring, client_done}, return_when=asyncio.FIRST_COMPLETED)
            if not acquiring.done():
                holder.abandoned = True  # no further lease is waited for
                with contextlib.suppress(Exception):
                    await acquiring
                return
            acquiring.result()  # LimitUnusable ends the request with an error
            writer.write(encode(self._granted_message(holder, slots)))
            await writer.drain()
            for member in holder.group:
                member.phase = Phase.ANNOUNCED
            line = await client_done
            await self._finish(holder, slots)
            if not line:  # died or left without a release: its slots are back now
                self.stats.reclaimed_on_disconnect += 1
            if line:  # a release asked for (not a dropped connection): confirm it
                writer.write(encode({"event": "released"}))
                await writer.drain()
        finally:
            if not client_done.done():
                client_done.cancel()
            if ticket in self._holders:
                await self._finish(holder, slots)

    async def _companion_limits(
        self, acquire: AcquireRequest, slots: LimitSlots
    ) -> list[tuple[str, int]]:
        """The limits held beside the slot lease, in the order they are taken.

        Raises:
            LimitUnusable: one is missing or inactive (the step fails closed).
            Unserviceable: one can never hold what is asked of it.
        """
        held: list[tuple[str, int]] = []
        if acquire.memory_gib is not None:
            memory = await self._placing(slots)
            held.append((memory.name, acquire.memory_gib))
        for name, occupy in acquire.also:
            held.append((name, occupy))
        for name, occupy in held:
            size = (await self._companion_slots(name)).info.limit
            if occupy > size:
                raise Unserviceable(f"{occupy} asked of {name!r}, a limit of {size}")
        return held

    def _granted_message(self, holder: Holder, slots: LimitSlots) -> dict[str, Any]:
        assert holder.lease is not None
        message: dict[str, Any] = {
            "event": "granted",
            "lease_id": str(holder.lease.id),
            "lease_ids": [str(m.lease.id) for m in holder.group if m.lease is not None],
            "waited_s": round(holder.leased_at - holder.queued_at, 6),
        }
        position = slots.queue.placement(holder.ticket)
        if position is not None:
            gpu = self.gpus[position] if position < len(self.gpus) else WorkerGpu(position)
            message["gpu"] = {
                "position": position,
                "uuid": gpu.uuid,
                "memory_gib": slots.queue.gpus[position],
            }
        return message

    def _admit(self, pid: int | None, run_id: str | None, slots: LimitSlots, occupy: int) -> None:
        """Raise :class:`Refused` unless the process may queue (:func:`grants.admission`)."""
        runs = self.runs_in_flight() if self.runs_in_flight is not None else None
        run_slots = sum(
            held.occupy
            for held in self._holders.values()
            if held.run_id == run_id and held.limit == slots.name
        )
        refusal = admission(run_id, runs, run_slots, occupy, slots.queue.capacity)
        if refusal is Refusal.STRANGER:
            raise Refused(
                refusal,
                f"process {pid} is not a flow run that worker {self.worker_id} executes "
                f"({FLOW_RUN_ID_ENV}={run_id}); GPU steps of other processes wait at "
                "Prefect's limit",
            )
        if refusal is Refusal.RUN_CAP:
            raise Refused(
                refusal,
                f"flow run {run_id} holds or waits for {run_slots} of {slots.name}'s "
                f"{slots.queue.capacity} slots already; {occupy} more would exceed them",
            )

    async def _acquire(self, holder: Holder, slots: LimitSlots) -> None:
        """Take the grant's leases one after the other: its companions' in order, then
        the slot's (see the module docstring)."""
        for member in (*holder.companions, holder):
            if member.lease is None:  # else passed on by the step before it (_pass_lease)
                await self._take_lease(member, holder)
        self._granted(holder, slots)

    async def _take_lease(self, member: Holder, grant: Holder) -> None:
        """Try until Prefect grants ``member``'s lease; stop between tries once the
        step is gone (a lease taken meanwhile is given back with the grant's).

        Raises:
            Abandoned: the step left.
            LimitUnusable: the limit is gone or too small.
        """
        attempt = 0
        while True:
            if grant.abandoned:
                raise Abandoned(f"the step left while {member.limit} was taken")
            try:
                outcome = await self.prefect.try_acquire(member.limit, member.occupy, member.holder)
            except Exception as exc:
                if not transient(exc):
                    raise
                attempt += 1
                await asyncio.sleep(min(0.25 * attempt, 2.0))
                continue
            if isinstance(outcome, Lease):
                member.take_lease(outcome, self.clock())
                return
            await asyncio.sleep(outcome)

    def _granted(self, holder: Holder, slots: LimitSlots) -> None:
        """Count a grant whose lease ``holder`` now has."""
        now = self.clock()
        holder.leased_at = now
        self.stats.grants += 1
        self.stats.wait_seconds.observe(now - holder.queued_at)
        self.accounting.granted(
            holder.ticket,
            slots.name,
            holder.labels,
            holder.occupy,
            now - holder.queued_at,
            now,
            gpu=slots.queue.placement(holder.ticket),
        )
        if slots.released_with_waiters_at is not None:
            self.stats.handoff_seconds.observe(now - slots.released_with_waiters_at)
            slots.released_with_waiters_at = None

    async def _finish(self, holder: Holder, slots: LimitSlots) -> None:
        """Pass the lease to the next waiter, or release it to Prefect first, then
        locally; then grant the next waiters."""
        if self._holders.pop(holder.ticket, None) is None:
            return
        self.accounting.released(holder.ticket, self.clock())
        for companion in holder.companions:
            self._holders.pop(companion.ticket, None)
        if holder.lease is not None and slots.queue.waiters:
            # The handoff gap runs from here to the next waiter's lease.
            slots.released_with_waiters_at = self.clock()
        self._pass_lease(holder, slots)
        leased = [member for member in holder.group if member.lease is not None]
        if leased and self._closing and holder.phase is Phase.ANNOUNCED:
            pass  # the step still runs and releases its own leases (see close)
        elif leased:
            give_backs = [
                self._spawn(self._give_backs.give_back(member, retry=True)) for member in leased
            ]
            # A server that is down must not hold the step's exit: the give-backs
            # go on in the background, and Prefect refuses the next waiter's
            # leases until they land, so nothing runs past a limit meanwhile.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(asyncio.gather(*give_backs)), timeout=5.0)
        slots.queue.cancel(holder.ticket)
        self._dispatch(slots)

    def _pass_lease(self, holder: Holder, slots: LimitSlots) -> None:
        """Hand ``holder``'s Prefect lease to the waiter that takes its slots.

        The slots stay held in Prefect throughout (its count never dips), and
        the handoff costs no request: the heir needs no acquire, the holder no
        release. Prefect keeps naming the lease's first holder. A lease that
        Prefect lost is not passed (its give-back repairs the count).
        """
        if holder.lease is None or holder.hold is not LeaseHold.ALIVE or self._closing:
            return
        if holder.companions:
            return  # its heir would need the same companions: each gives back its own
        if self.clock() - holder.renewed_at >= holder.lease.duration:
            # Not renewed within its duration (the server was away): the
            # repossessor may have taken it, and an heir on it would run
            # uncounted. The heir takes a fresh lease instead.
            return
        ticket = slots.queue.heir(holder.ticket)
        heir = self._holders.get(ticket) if ticket is not None else None
        if heir is None or heir.lease is not None or heir.companions:
            return
        heir.take_lease(holder.lease, holder.renewed_at)
        holder.lease = None
        self.stats.leases_passed += 1

    def _dispatch(self, slots: LimitSlots) -> None:
        if self._closing:
            return  # waiters are being sent away to poll Prefect: grant nobody
        for ticket in slots.queue.grant():
            self._holders[ticket].grant()
        if self.on_dispatch is not None:
            self.on_dispatch()
