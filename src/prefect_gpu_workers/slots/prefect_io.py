"""The broker's calls to Prefect: read a limit, take, renew and give back leases.

Each call is made once, bounded, without the Prefect client's own retries:
the broker decides what may be sent again (``leases.release_action``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.context import SettingsContext, get_settings_context
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, Settings

from prefect_gpu_workers.slots.leases import Lease, LeaseState, classify_gone_lease

# Answers that say the request did nothing: Prefect answers 503 for database
# errors a client may retry (SQLite busy, a lost PostgreSQL connection) and the
# transaction is rolled back (a connection lost during the commit itself is the
# one case no client can tell); 429 is a refusal before any work.
NOT_APPLIED = frozenset({429, 503})


# A new lease is taken for Prefect's shortest duration, and renewed for the
# broker's own at the first upkeep after a quarter of it. An increment whose
# answer is lost (a timeout, a 500 after the commit) leaves a lease nobody
# knows; Prefect's API has no way to find it, so it holds its slots until it
# expires: a minute instead of five.
FIRST_LEASE_S = 60.0


def transient(exc: BaseException) -> bool:
    """An error worth another try: no answer, or the server said it could not serve now.

    Prefect answers 503 when its database is busy (SQLite locked) and rolls the
    transaction back, so the request did nothing and may be sent again.
    """
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and (
        exc.response.status_code >= 500 or exc.response.status_code in NOT_APPLIED
    )


class LimitUnusable(Exception):
    """The Prefect limit cannot gate a step (missing, inactive, too small)."""


@dataclass(frozen=True)
class LimitInfo:
    id: UUID
    limit: int
    active: bool
    read_at: float = 0.0  # the clock when the read was sent: it shows no older state
    active_slots: int = 0  # Prefect's count of the limit's slots in use at that read


# Settings -> the same without the client's retries. Copying Prefect's settings
# validates every field (about a tenth of a second): done once per settings
# object, not once per broker (the simulation starts thousands).
_NO_RETRIES: dict[int, tuple[Settings, Settings]] = {}


def _without_retries(settings: Settings) -> Settings:
    cached = _NO_RETRIES.get(id(settings))
    if cached is not None and cached[0] is settings:
        return cached[1]
    copy = settings.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0})
    if len(_NO_RETRIES) >= 8:  # a few settings objects live at once; keep no more
        _NO_RETRIES.clear()
    _NO_RETRIES[id(settings)] = (settings, copy)  # the source kept: its id is not reused
    return copy


class PrefectSlots:
    """The broker's Prefect calls: read the limit, take, renew and give back leases.

    Each call is made once, without the Prefect client's own retries (which back
    off up to a minute while a server restarts): the broker retries on its own
    schedule, and only where a retry cannot count a slot twice.
    """

    def __init__(
        self,
        client: PrefectClient,
        lease_duration: float,
        busy_poll_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.clock = clock
        self.lease_duration = lease_duration
        self.busy_poll_s = busy_poll_s
        context = get_settings_context()
        self._profile = context.profile
        self._settings = _without_retries(context.settings)

    def _once(self) -> SettingsContext:
        # Both fields are validated already: constructing without validation
        # spares each request a quarter of a millisecond (thousands per sweep).
        return SettingsContext.model_construct(profile=self._profile, settings=self._settings)

    async def read_limit(self, name: str) -> LimitInfo | None:
        sent_at = self.clock()
        try:
            with self._once():
                limit = await self.client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None
        return LimitInfo(limit.id, limit.limit, limit.active, sent_at, limit.active_slots)

    async def read_deployment_name(self, deployment_id: UUID) -> str | None:
        """The deployment's name; None when Prefect does not know the id."""
        try:
            with self._once():
                deployment = await self.client.read_deployment(deployment_id)
        except ObjectNotFound:
            return None
        return deployment.name

    async def try_acquire(
        self, name: str, occupy: int, holder: ConcurrencyLeaseHolder | None
    ) -> Lease | float:
        """One attempt: the lease, or the seconds to wait before the next attempt.

        The lease is taken for :data:`FIRST_LEASE_S` (or the broker's duration,
        when shorter); renewals extend it to the broker's duration.

        Raises:
            LimitUnusable: the limit does not exist or cannot hold ``occupy``.
            httpx.TransportError: the server cannot be reached.
        """
        try:
            with self._once():
                response = await self.client.increment_concurrency_slots_with_lease(
                    names=[name],
                    slots=occupy,
                    mode="concurrency",
                    lease_duration=self.first_lease_duration,
                    holder=holder,
                )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:
                # Someone outside the broker holds slots: only this waiter polls.
                retry_after = float(exc.response.headers.get("Retry-After", self.busy_poll_s))
                return min(retry_after, self.busy_poll_s)
            if exc.response.status_code == 422:
                raise LimitUnusable(f"limit {name!r} cannot hold {occupy} slot(s)") from exc
            raise
        body = response.json()
        if not body.get("limits"):
            raise LimitUnusable(f"limit {name!r} does not exist")
        return Lease(
            UUID(body["lease_id"]),
            UUID(body["limits"][0]["id"]),
            self.first_lease_duration,
            taken_at=self.clock(),
        )

    @property
    def first_lease_duration(self) -> float:
        return min(FIRST_LEASE_S, self.lease_duration)

    async def probe(self, lease: Lease, seconds_since_renewal: float) -> LeaseState:
        """Renew the lease (for the broker's full duration); say whether the server
        still knows it."""
        try:
            with self._once():
                await self.client.renew_concurrency_lease(lease.id, self.lease_duration)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 410:
                return classify_gone_lease(seconds_since_renewal, lease.duration)
            return LeaseState.UNKNOWN
        except httpx.TransportError:
            return LeaseState.UNKNOWN
        return LeaseState.ALIVE

    async def release_lease(self, lease_id: UUID) -> None:
        with self._once():
            await self.client.release_concurrency_slots_with_lease(lease_id)

    async def decrement(self, name: str, occupy: int, held_s: float) -> None:
        with self._once():
            await self.client.release_concurrency_slots(
                names=[name], slots=occupy, occupancy_seconds=max(held_s, 0.001)
            )


# Deployment names kept per broker: one read per deployment id for the life
# of the worker; a worker that saw more deployments than this reads again.
MAX_DEPLOYMENT_NAMES = 1024
# The longest a step's request waits for its deployment's name: past it the
# step is counted under the id (its grant must not wait on accounting).
DEPLOYMENT_READ_S = 5.0


class DeploymentNames:
    """Deployment id -> name, read from Prefect once per id, shared by concurrent asks.

    A failed or slow read is not kept (the next step asks again) and names the
    step by its id meanwhile; an id Prefect does not know is kept, named by itself.
    """

    def __init__(self, prefect: Callable[[], PrefectSlots], timeout_s: float = DEPLOYMENT_READ_S):
        self._prefect = prefect
        self._timeout_s = timeout_s
        self._names: dict[UUID, str | None] = {}
        self._reading: dict[UUID, asyncio.Future[str | None]] = {}

    async def name(self, deployment_id: UUID) -> str:
        """The deployment's name, or its id where the name cannot be read now or at all."""
        if deployment_id in self._names:
            return self._names[deployment_id] or str(deployment_id)
        future = self._reading.get(deployment_id)
        if future is None:
            future = asyncio.ensure_future(self._read(deployment_id))
            # Retrieved here, so that a failure nobody waited for is not logged as lost.
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._reading[deployment_id] = future
        try:
            # Shielded: one step giving up must not cancel the read others wait for.
            found = await asyncio.wait_for(asyncio.shield(future), timeout=self._timeout_s)
        except Exception:
            return str(deployment_id)
        return found or str(deployment_id)

    async def _read(self, deployment_id: UUID) -> str | None:
        try:
            found = await self._prefect().read_deployment_name(deployment_id)
        finally:
            self._reading.pop(deployment_id, None)
        if len(self._names) >= MAX_DEPLOYMENT_NAMES:
            self._names.pop(next(iter(self._names)))  # the oldest read
        self._names[deployment_id] = found
        return found
