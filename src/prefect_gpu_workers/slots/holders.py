"""A GPU step's request as the broker holds it: where it is, and what is known of its lease.

Two explicit states per holder: :class:`Phase` (waiting, granted, refused,
announced) and :class:`~prefect_gpu_workers.slots.leases.LeaseHold` (alive,
lost, release-sent, decrement-sent), which alone decides its give-back.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum

from prefect.client.schemas.objects import ConcurrencyLeaseHolder

from prefect_gpu_workers.slots.accounting import StepLabels
from prefect_gpu_workers.slots.grants import GrantQueue
from prefect_gpu_workers.slots.leases import Lease, LeaseHold
from prefect_gpu_workers.slots.metrics import Histogram
from prefect_gpu_workers.slots.prefect_io import LimitInfo


class Phase(Enum):
    """Where a step's request is."""

    WAITING = "waiting"  # queued
    GRANTED = "granted"  # its turn came; the Prefect lease is being taken
    REFUSED = "refused"  # never grantable: told so
    ANNOUNCED = "announced"  # leased and told: the step runs


@dataclass
class Holder:
    """One connection's request, then grant.

    Two explicit states: ``phase`` (where the step's request is) and ``hold``
    (what is known of its Prefect lease, which decides the give-back).
    """

    ticket: int
    limit: str
    occupy: int
    holder: ConcurrencyLeaseHolder | None
    queued_at: float
    phase: Phase = Phase.WAITING
    decided: asyncio.Event = field(default_factory=asyncio.Event)  # granted or refused
    refusal: str = ""
    lease: Lease | None = None
    hold: LeaseHold = LeaseHold.ALIVE
    leased_at: float = 0.0
    renewed_at: float = 0.0
    pid: int | None = None  # the step's process (SO_PEERCRED), for operators and fault drills
    run_id: str | None = None  # that process's flow run (its PREFECT__FLOW_RUN_ID)
    # The other limits held with this grant, in the order their leases are
    # taken (the memory limit, then ``also`` by name, all before the slot's);
    # each its own lease.
    companions: tuple[Holder, ...] = ()
    abandoned: bool = False  # the step left before all its leases were taken
    labels: StepLabels = field(
        default_factory=StepLabels
    )  # who asks: what its held time is counted under

    @property
    def group(self) -> tuple[Holder, ...]:
        """This holder and its companions: every lease of the grant."""
        return (self, *self.companions)

    def grant(self) -> None:
        """Its turn came: the broker takes its lease now."""
        self.phase = Phase.GRANTED
        self.decided.set()

    def refuse(self, why: str) -> None:
        """It can never be granted (the limit shrank below what it asks)."""
        self.phase, self.refusal = Phase.REFUSED, why
        self.decided.set()

    def take_lease(self, lease: Lease, renewed_at: float) -> None:
        """Hold ``lease`` from now on: what was known of the one before goes with it
        (a lost lease's re-count after a limit is recreated is a live one)."""
        self.lease, self.renewed_at, self.hold = lease, renewed_at, LeaseHold.ALIVE


@dataclass
class LimitSlots:
    name: str
    info: LimitInfo
    queue: GrantQueue
    released_with_waiters_at: float | None = None
    # Held only alongside another limit's grants (a memory limit, an ``also``
    # limit): nobody queues here, Prefect alone decides.
    companion: bool = False


@dataclass
class BrokerStats:
    """Counters and histograms since start (seconds), for metrics and benchmarks."""

    grants: int = 0
    reclaimed_on_disconnect: int = 0
    lost_leases_repaired: int = 0
    leases_passed: int = 0  # handoffs that passed a lease on, with no Prefect request
    wait_seconds: Histogram = field(default_factory=Histogram)
    handoff_seconds: Histogram = field(default_factory=Histogram)
