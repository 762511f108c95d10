"""How a finished holder's slots go back to Prefect, whatever the server does.

The decision is :func:`~prefect_gpu_workers.slots.leases.release_action` on the
holder's :class:`~prefect_gpu_workers.slots.leases.LeaseHold`: a live lease is
probed, then released; a lease a restart forgot is decremented by hand, by
exactly its slots; once a give-back may have landed, only a release is ever
sent again, and a decrement never. Here is the I/O around that decision:
sending, remembering what was sent, and trying again while the server is away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx

from prefect_gpu_workers.slots.holders import BrokerStats, Holder
from prefect_gpu_workers.slots.leases import (
    Lease,
    LeaseHold,
    LeaseState,
    ReleaseAction,
    release_action,
    unclear_send,
)
from prefect_gpu_workers.slots.prefect_io import NOT_APPLIED, PrefectSlots, transient

logger = logging.getLogger(__name__)


class GiveBacks:
    """The broker's give-backs: one per finished holder whose lease it still has.

    Args:
        prefect: the broker's Prefect calls (there once the broker started).
        clock: the broker's clock.
        stats: the broker's counters (lost leases repaired).
    """

    def __init__(
        self, prefect: Callable[[], PrefectSlots], clock: Callable[[], float], stats: BrokerStats
    ) -> None:
        self.prefect = prefect
        self.clock = clock
        self.stats = stats
        self.in_flight = 0  # still retrying while the server is away

    async def give_back(self, holder: Holder, retry: bool) -> None:
        """Give ``holder``'s slots back to Prefect (``retry``: until the server answers)."""
        self.in_flight += 1
        try:
            await self._until_done(holder, retry)
        finally:
            self.in_flight -= 1

    async def _until_done(self, holder: Holder, retry: bool) -> None:
        lease = holder.lease
        assert lease is not None
        while True:
            now = self.clock()
            try:
                action = await self.release_once(holder, lease, now)
            except Exception as exc:
                if not transient(exc):
                    logger.exception("giving back %s failed", holder.limit)
                    action = ReleaseAction.NOTHING
                elif holder.hold is LeaseHold.DECREMENT_SENT:
                    # A bare decrement that may have landed is never sent again: a
                    # second one could uncount another holder. The broker errs
                    # towards a slot counted too long.
                    logger.warning("giving back %s: answer lost (%r)", holder.limit, exc)
                    action = ReleaseAction.NOTHING
                else:
                    action = ReleaseAction.RETRY  # a release is safe to send again
            if action is not ReleaseAction.RETRY or not retry:
                holder.lease = None
                return
            await asyncio.sleep(0.5)

    async def _send(self, holder: Holder, action: ReleaseAction, request: Awaitable[None]) -> None:
        """Send a give-back request; remember it as sent unless it surely did nothing.

        A refused connection sent nothing, and a 503 or 429 is Prefect refusing
        the work (its database was busy: the transaction is rolled back). Any
        other failure (a 500, a timeout, a reset) may come after the server
        applied it: Prefect decrements before it answers, and an answer can be
        lost on the way.
        """
        try:
            await request
        except httpx.ConnectError:
            raise
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code not in NOT_APPLIED:
                holder.hold = unclear_send(action)
            raise
        except BaseException:
            holder.hold = unclear_send(action)
            raise

    async def release_once(self, holder: Holder, lease: Lease, now: float) -> ReleaseAction:
        """Probe the lease, then release it or decrement by hand (see release_action).

        Once a release was sent it is only ever sent again, without a probe: the
        lease of a release that landed is gone, and a probe's 410 would read as
        "lost by a restart" and lead to a second, bare decrement.
        """
        if holder.hold is LeaseHold.RELEASE_SENT:
            await self._send(
                holder, ReleaseAction.RELEASE_LEASE, self.prefect().release_lease(lease.id)
            )
            return ReleaseAction.RELEASE_LEASE
        # A lease the server lost stays lost: probing it again would, a lease
        # duration after its last renewal, read the same 410 as "expired" and
        # give nothing back, and the server's repossessor does not know it.
        if holder.hold is LeaseHold.LOST:
            state = LeaseState.LOST
        else:
            state = await self.prefect().probe(lease, now - holder.renewed_at)
        same_limit = True
        if state is LeaseState.LOST:
            holder.hold = LeaseHold.LOST
            info = await self.prefect().read_limit(holder.limit)  # transient errors: retry
            same_limit = info is not None and info.id == lease.limit_id
        action = release_action(state, same_limit)
        if action is ReleaseAction.RELEASE_LEASE:
            await self._send(holder, action, self.prefect().release_lease(lease.id))
        elif action is ReleaseAction.DECREMENT:
            held_s = now - holder.leased_at
            await self._send(
                holder, action, self.prefect().decrement(holder.limit, holder.occupy, held_s)
            )
            self.stats.lost_leases_repaired += 1
            logger.warning(
                "Prefect lost the lease of %d slot(s) of %s (server restart?): decremented by hand",
                holder.occupy,
                holder.limit,
            )
        return action
