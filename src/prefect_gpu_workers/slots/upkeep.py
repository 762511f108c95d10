"""What the slot broker does between requests: re-read its limits, re-count the
holders of a limit deleted and created again, renew the leases it holds.

Two loops, each ticking every ``maintenance_s``: the renewals, and the limit
upkeep (the limit reads every ``limit_refresh_s``, then the re-count). Each
part on its own: one that keeps failing or waits out a lost answer (a 422
after a shrink, a proxy's 5xx) must not stop the others, or every lease
expires while its step still runs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from prefect_gpu_workers.slots.holders import Holder, LimitSlots
from prefect_gpu_workers.slots.leases import Lease, LeaseHold, LeaseState, counts_nothing
from prefect_gpu_workers.slots.prefect_io import PrefectSlots, transient

logger = logging.getLogger(__name__)


class Upkeep:
    """The broker's upkeep over its ``limits`` and ``holders`` (the broker's own dicts).

    Args:
        limits: the broker's limits by name.
        holders: the broker's holders by ticket.
        prefect: the broker's Prefect calls (once started).
        clock: the broker's clock.
        dispatch: grants the next waiters of a limit (after a resize).
        spawn: runs a coroutine in the broker's background (closed with it).
        lease_duration: what a renewal extends a lease to.
        maintenance_s: seconds between ticks.
        limit_refresh_s: seconds between limit reads.
    """

    def __init__(
        self,
        limits: dict[str, LimitSlots],
        holders: dict[int, Holder],
        prefect: Callable[[], PrefectSlots],
        clock: Callable[[], float],
        dispatch: Callable[[LimitSlots], None],
        spawn: Callable[[Any], asyncio.Task[Any]],
        lease_duration: float,
        maintenance_s: float,
        limit_refresh_s: float,
    ) -> None:
        self.limits, self.holders, self.prefect = limits, holders, prefect
        self.clock, self.dispatch, self.spawn = clock, dispatch, spawn
        self.lease_duration = lease_duration
        self.maintenance_s, self.limit_refresh_s = maintenance_s, limit_refresh_s
        self._read_at = clock()

    async def run(self) -> None:
        """The renewals and the limit upkeep, each in a loop of its own: a limit
        read or a re-count waiting out a lost answer must not hold the renewals
        (seed 8650: two such waits in a row let a lease's first minute pass
        unrenewed after a restart, and its 410 then read as expired, not lost)."""
        await asyncio.gather(
            self._every_tick(self.renew_leases), self._every_tick(self._limit_upkeep)
        )

    async def _limit_upkeep(self) -> None:
        if self.clock() - self._read_at >= self.limit_refresh_s:
            self._read_at = self.clock()
            await self._quietly(self.refresh_limits)
        await self._quietly(self.recount)

    async def _every_tick(self, upkeep: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.maintenance_s)
            await self._quietly(upkeep)

    async def _quietly(self, upkeep: Callable[[], Awaitable[None]]) -> None:
        # Each on its own: a limit read that keeps failing (a 422 after a
        # shrink, a proxy's 5xx) must not stop the re-count or the renewals.
        try:
            await upkeep()
        except Exception as exc:  # the server may be restarting: next tick
            logger.debug("slot broker upkeep (%s): %r", upkeep.__name__, exc)

    async def refresh_limits(self) -> None:
        """Re-read each limit: apply a resize; note a recreated one (:meth:`recount`)."""
        for slots in list(self.limits.values()):
            info = await self.prefect().read_limit(slots.name)
            if info is None:
                continue  # deleted: leases die with it; a recreated one is re-counted
            if info.limit != slots.queue.capacity and info.limit >= 1:
                for ticket in slots.queue.resize(info.limit):
                    why = f"limit {slots.name!r} shrank to {info.limit} slot(s)"
                    self.holders[ticket].refuse(why)
                self.dispatch(slots)
            if info.id != slots.info.id:
                logger.warning("limit %s was recreated: re-counting its holders", slots.name)
            slots.info = info

    async def recount(self) -> None:
        """Take a lease of the limit as it is now for each holder whose lease names
        a limit that was deleted (it counts nothing: Prefect would admit others
        beside the step). Every tick until it lands, not only when the limit is
        re-read: a step runs uncounted meanwhile."""
        for holder in list(self.holders.values()):
            slots = self.limits.get(holder.limit)
            old = holder.lease
            if (
                slots is None
                or old is None
                or not counts_nothing(old, slots.info.id, slots.info.read_at)
            ):
                continue
            outcome = await self.prefect().try_acquire(holder.limit, holder.occupy, holder.holder)
            if not isinstance(outcome, Lease):
                continue  # no room now: the next tick tries again
            if self.holders.get(holder.ticket) is holder and holder.lease is old:
                holder.take_lease(outcome, self.clock())
                # The old lease names a limit that is gone: it counts nothing,
                # but would sit in Prefect's lease storage until it expires.
                self.spawn(self._release_quietly(old))
            else:
                # It finished or passed its lease on while the lease was taken:
                # the new lease is nobody's (an heir is re-counted on its own).
                self.spawn(self._release_quietly(outcome))

    async def _release_quietly(self, lease: Lease) -> None:
        """Give back a lease no holder owns, until it lands or would have expired.

        A re-count's new lease whose holder finished meanwhile counts slots of
        the limit as it is now: given up after one refused attempt, it held
        them until the repossessor came (seed 4286: a minute of a 2-slot GPU).
        Sending the release again is always safe: Prefect ignores a lease it no
        longer knows.
        """
        give_up_at = self.clock() + lease.duration
        for attempt in itertools.count(1):
            try:
                await self.prefect().release_lease(lease.id)
                return
            except Exception as exc:
                pause = min(0.25 * 2**attempt, 5.0)
                if not transient(exc) or self.clock() + pause >= give_up_at:
                    logger.warning(
                        "giving back an unowned lease of %s failed: %r", lease.limit_id, exc
                    )
                    return
                await asyncio.sleep(pause)

    async def renew_leases(self) -> None:
        now = self.clock()
        due = [
            (holder, holder.lease)
            for holder in self.holders.values()
            # A lost lease cannot be renewed; its give-back repairs the count.
            if holder.lease is not None
            and holder.hold is LeaseHold.ALIVE
            and now - holder.renewed_at >= holder.lease.duration / 4
        ]
        # All at once, each bounded: one slow answer must not hold the others
        # past their leases (the client's own timeout is a minute).
        states = await asyncio.gather(
            *(self._probe_bounded(lease, now - holder.renewed_at) for holder, lease in due)
        )
        for (holder, lease), state in zip(due, states, strict=True):
            if holder.lease is not lease:
                continue  # passed on or given back meanwhile: the answer is not its own
            if state is LeaseState.ALIVE:
                holder.renewed_at = now
                holder.lease = replace(lease, duration=self.lease_duration)
            elif state is LeaseState.LOST and holder.hold is LeaseHold.ALIVE:
                holder.hold = LeaseHold.LOST
                logger.warning("Prefect lost the lease of a holder of %s", holder.limit)

    async def _probe_bounded(self, lease: Lease, seconds_since_renewal: float) -> LeaseState:
        """:meth:`PrefectSlots.probe`, UNKNOWN after an eighth of the lease's duration."""
        try:
            probe = self.prefect().probe(lease, seconds_since_renewal)
            return await asyncio.wait_for(probe, timeout=lease.duration / 8)
        except TimeoutError:
            return LeaseState.UNKNOWN
