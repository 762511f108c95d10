"""The slot broker's decisions, with the standard library only: who gets a slot next.

A worker's slot broker (``broker.py``) serves the GPU steps of that worker's
flow runs. This module holds its pure logic, so that it is tested without
sockets or a Prefect server:

- :class:`GrantQueue`: FIFO grants that respect ``occupy``. A waiter is never
  overtaken: while the head of the queue does not fit, nobody behind it is
  granted, so an ``occupy=2`` step is not starved by a stream of ``occupy=1``
  steps (head-of-line blocking is the price, and a bounded one: the head is
  granted as soon as the steps ahead of it finish).
- :func:`intake_open`: whether the worker takes new flow runs at a poll, given
  its GPU queue.
- :func:`admission`: which processes may queue, and how much one flow run may ask.

Example:
    >>> queue = GrantQueue(capacity=2)
    >>> queue.request(1, occupy=1); queue.request(2, occupy=2); queue.request(3, occupy=1)
    >>> queue.grant()
    [1]
    >>> queue.release(1)
    1
    >>> queue.grant()
    [2]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import Enum


class Unserviceable(ValueError):
    """A request asks for more slots than the limit has: it would wait forever."""


@dataclass
class GrantQueue:
    """FIFO, occupy-aware grants of ``capacity`` slots to numbered tickets.

    Tickets are opaque integers chosen by the caller (one per connection).
    ``grant`` must be called after every change (request, release, cancel,
    capacity) to learn which waiters now hold their slots.
    """

    capacity: int

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {self.capacity}")
        self._waiting: OrderedDict[int, int] = OrderedDict()
        self._held: dict[int, int] = {}

    @property
    def held_slots(self) -> int:
        """Slots held by granted tickets (may exceed capacity after a shrink)."""
        return sum(self._held.values())

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - self.held_slots)

    @property
    def waiters(self) -> int:
        return len(self._waiting)

    @property
    def waiting_slots(self) -> int:
        return sum(self._waiting.values())

    def holds(self, ticket: int) -> bool:
        return ticket in self._held

    def request(self, ticket: int, occupy: int) -> None:
        """Queue ``ticket`` for ``occupy`` slots, behind every earlier request.

        Raises:
            ValueError: ``occupy`` below 1 or the ticket already known.
            Unserviceable: ``occupy`` above the capacity.
        """
        if occupy < 1:
            raise ValueError(f"occupy must be at least 1, got {occupy}")
        if ticket in self._waiting or ticket in self._held:
            raise ValueError(f"ticket {ticket} is already queued or holding")
        if occupy > self.capacity:
            raise Unserviceable(f"{occupy} slot(s) asked of a limit of {self.capacity}")
        self._waiting[ticket] = occupy

    def grant(self) -> list[int]:
        """Grant waiters from the head while the head fits; never past a waiting head."""
        granted: list[int] = []
        while self._waiting:
            ticket, occupy = next(iter(self._waiting.items()))
            if occupy > self.free_slots:
                break
            del self._waiting[ticket]
            self._held[ticket] = occupy
            granted.append(ticket)
        return granted

    def heir(self, ticket: int) -> int | None:
        """The waiter that takes exactly the slots ``ticket`` holds when it leaves.

        That is the head of the queue when it asks for as many slots as
        ``ticket`` holds and fits once they are free; the holder's Prefect
        lease can then pass to it as it is, with no release and no acquire.

        Example:
            >>> queue = GrantQueue(1)
            >>> queue.request(1, 1); queue.request(2, 1); queue.grant()
            [1]
            >>> queue.heir(1)
            2
        """
        held = self._held.get(ticket)
        if held is None or not self._waiting:
            return None
        head, occupy = next(iter(self._waiting.items()))
        # Room once ``ticket`` is gone, counted from the capacity: after a shrink
        # the others may hold more than it, and a lease parked on a head that
        # cannot be granted would hold Prefect's slot from everyone.
        if occupy != held or occupy > self.capacity - (self.held_slots - held):
            return None
        return head

    def release(self, ticket: int) -> int:
        """Give back a granted ticket's slots; return how many (0 if it held none)."""
        return self._held.pop(ticket, 0)

    def cancel(self, ticket: int) -> int:
        """Forget ``ticket`` wherever it is; return the slots it held (0 if it waited)."""
        if self._waiting.pop(ticket, None) is not None:
            return 0
        return self.release(ticket)

    def resize(self, capacity: int) -> list[int]:
        """Set a new capacity; return the waiters that can never fit it (removed).

        Holders above a smaller capacity keep their slots; nobody is granted
        until enough of them have finished.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        dropped = [ticket for ticket, occupy in self._waiting.items() if occupy > capacity]
        for ticket in dropped:
            del self._waiting[ticket]
        return dropped


def intake_open(capacity: int, waiting_slots: int) -> bool:
    """Whether a worker takes new flow runs at this poll, given its GPU queue.

    Closed while the slots asked for by waiting GPU steps reach the worker's
    slots: its queue already holds a full round of GPU work, and runs taken now
    would only wait, while another worker may have idle slots. Open otherwise,
    up to the worker's flow-run limit (which local mode and the operator size
    from the slots). A per-poll cap would be worse: polls are seconds apart
    (Prefect's default is 10 s), so a cap of a few runs per poll would starve
    the GPU of a single worker.
    """
    return waiting_slots < capacity


class Refusal(Enum):
    """Why the broker turns a step's request away before it queues."""

    STRANGER = "stranger"  # not a process of a flow run this worker executes
    RUN_CAP = "run_cap"  # its flow run holds or waits for the limit's every slot already


def admission(
    peer_run: str | None,
    runs_in_flight: AbstractSet[str] | None,
    run_slots: int,
    occupy: int,
    capacity: int,
) -> Refusal | None:
    """Whether a step's request may queue at the broker; the refusal if not.

    The broker's socket is its worker user's; any process of that user can
    reach it. When the worker says which flow runs it executes
    (``runs_in_flight``), only their processes (and their children, which
    inherit the run's id) are served. A run may hold and wait for at most the
    limit's capacity at once, however many connections it opens: more would
    only keep other runs' steps waiting.

    Args:
        peer_run: the requesting process's flow-run id (``None``: it has none).
        runs_in_flight: the worker's runs; ``None``: no check (a broker alone).
        run_slots: slots that run holds and waits for at this limit already.
        occupy: slots asked for now.
        capacity: the limit's slots.

    Example:
        >>> admission("r1", {"r1"}, 0, 1, 2) is None
        True
        >>> admission("r9", {"r1"}, 0, 1, 2).value
        'stranger'
        >>> admission("r1", {"r1"}, 2, 1, 2).value
        'run_cap'
    """
    if runs_in_flight is not None and (peer_run is None or peer_run not in runs_in_flight):
        return Refusal.STRANGER
    if peer_run is not None and run_slots + occupy > capacity:
        return Refusal.RUN_CAP
    return None
