"""The slot broker's decisions, with the standard library only: who gets a slot next.

A worker's slot broker (``broker.py``) serves the GPU steps of that worker's
flow runs. This module holds its pure logic, so that it is tested without
sockets or a Prefect server:

- :class:`GrantQueue`: FIFO grants that respect ``occupy``. A waiter is never
  overtaken: while the head of the queue does not fit, nobody behind it is
  granted, so an ``occupy=2`` step is not starved by a stream of ``occupy=1``
  steps (head-of-line blocking is the price, and a bounded one: the head is
  granted as soon as the steps ahead of it finish).
- Memory placement, in the same queue: a request may also ask for GPU memory
  (whole GiB) and is then placed on one of the worker's GPUs with room
  (:meth:`GrantQueue.placement`). A request that finds no room claims the GPU
  closest to fitting it: nobody behind it is placed there until it is, so a
  large step is never starved by smaller ones, while a later request that fits
  on another GPU starts there.
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


@dataclass(frozen=True)
class WorkerGpu:
    """One GPU of a worker as its broker places memory on it."""

    position: int  # what its steps address it as: ``cuda:<position>``
    uuid: str = ""  # ``GPU-...`` / ``MIG-...`` where known
    memory_gib: int | None = None  # whole GiB; None: a share of the memory limit

    @property
    def device(self) -> str:
        return f"cuda:{self.position}"


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
    # Each GPU's memory in whole GiB, in the order the worker's steps address
    # them (``cuda:<position>``); empty: requests for memory are unserviceable.
    gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {self.capacity}")
        self._waiting: OrderedDict[int, int] = OrderedDict()
        self._held: dict[int, int] = {}
        self._memory_asked: dict[int, int] = {}  # ticket -> GiB, waiting or held
        self._placed: dict[int, int] = {}  # ticket -> GPU position, held
        self._gpu_used: list[int] = [0] * len(self.gpus)

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

    def placement(self, ticket: int) -> int | None:
        """The GPU position a granted memory request was placed on; ``None`` otherwise."""
        return self._placed.get(ticket)

    @property
    def gpu_used(self) -> tuple[int, ...]:
        """GiB placed on each GPU now."""
        return tuple(self._gpu_used)

    def request(self, ticket: int, occupy: int, memory_gib: int | None = None) -> None:
        """Queue ``ticket`` for ``occupy`` slots (and ``memory_gib`` on one GPU),
        behind every earlier request.

        Raises:
            ValueError: ``occupy`` or ``memory_gib`` below 1, or the ticket already known.
            Unserviceable: ``occupy`` above the capacity, or ``memory_gib`` above
                every GPU's memory (the message says each GPU's).
        """
        if occupy < 1:
            raise ValueError(f"occupy must be at least 1, got {occupy}")
        if ticket in self._waiting or ticket in self._held:
            raise ValueError(f"ticket {ticket} is already queued or holding")
        if occupy > self.capacity:
            raise Unserviceable(f"{occupy} slot(s) asked of a limit of {self.capacity}")
        if memory_gib is not None:
            if memory_gib < 1:
                raise ValueError(f"memory must be at least 1 GiB, got {memory_gib}")
            if memory_gib > max(self.gpus, default=0):
                raise Unserviceable(unplaceable(memory_gib, self.gpus))
            self._memory_asked[ticket] = memory_gib
        self._waiting[ticket] = occupy

    def grant(self) -> list[int]:
        """Grant waiters in arrival order while they fit; see the module docstring.

        A waiter short of slots stops the round (nobody passes it); a memory
        waiter short of room claims the GPU closest to fitting it (the most
        free memory, then the lowest position) and the round goes on without
        that GPU; one that finds every GPU it fits claimed waits behind them.
        """
        granted: list[int] = []
        claimed: set[int] = set()
        for ticket, occupy in list(self._waiting.items()):
            memory = self._memory_asked.get(ticket)
            gpu = None if memory is None else self._room_for(memory, claimed)
            if memory is not None and gpu is None:
                self._claim(memory, claimed)
                continue
            if occupy > self.free_slots:
                break
            del self._waiting[ticket]
            self._held[ticket] = occupy
            if gpu is not None and memory is not None:
                self._placed[ticket] = gpu
                self._gpu_used[gpu] += memory
            granted.append(ticket)
        return granted

    def _free_gib(self, gpu: int) -> int:
        return self.gpus[gpu] - self._gpu_used[gpu]

    def _room_for(self, memory: int, claimed: set[int]) -> int | None:
        """The unclaimed GPU that fits ``memory`` most tightly (keeping large holes for
        large steps); ``None`` if none fits now."""
        fits = [
            g for g in range(len(self.gpus)) if g not in claimed and self._free_gib(g) >= memory
        ]
        return min(fits, key=lambda g: (self._free_gib(g) - memory, g)) if fits else None

    def _claim(self, memory: int, claimed: set[int]) -> None:
        """Keep later requests off the GPU closest to fitting ``memory``: it only drains."""
        could = [g for g in range(len(self.gpus)) if g not in claimed and self.gpus[g] >= memory]
        if could:
            claimed.add(max(could, key=lambda g: (self._free_gib(g), -g)))

    def set_gpus(self, gpus: tuple[int, ...]) -> list[int]:
        """Set each GPU's GiB (the memory limit was read or resized); return the
        waiters that can never fit any more (removed).

        Holders keep their places; a GPU that shrank under them admits nobody
        until enough of them have finished. GPUs that disappeared take their
        holders' memory with them from the count.
        """
        self.gpus = tuple(gpus)
        used = [0] * len(self.gpus)
        for ticket, gpu in self._placed.items():
            if gpu < len(used):
                used[gpu] += self._memory_asked[ticket]
        self._gpu_used = used
        largest = max(self.gpus, default=0)
        dropped = [t for t in self._waiting if self._memory_asked.get(t, 0) > largest]
        for ticket in dropped:
            del self._waiting[ticket]
            del self._memory_asked[ticket]
        return dropped

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
        if held is None or not self._waiting or ticket in self._memory_asked:
            return None
        head, occupy = next(iter(self._waiting.items()))
        if head in self._memory_asked:
            return None  # a lease of slots alone is not what a placement holds
        # Room once ``ticket`` is gone, counted from the capacity: after a shrink
        # the others may hold more than it, and a lease parked on a head that
        # cannot be granted would hold Prefect's slot from everyone.
        if occupy != held or occupy > self.capacity - (self.held_slots - held):
            return None
        return head

    def release(self, ticket: int) -> int:
        """Give back a granted ticket's slots (and memory); return how many slots
        (0 if it held none)."""
        gpu = self._placed.pop(ticket, None)
        memory = self._memory_asked.pop(ticket, 0)
        if gpu is not None and gpu < len(self._gpu_used):
            self._gpu_used[gpu] -= memory
        return self._held.pop(ticket, 0)

    def cancel(self, ticket: int) -> int:
        """Forget ``ticket`` wherever it is; return the slots it held (0 if it waited)."""
        if self._waiting.pop(ticket, None) is not None:
            self._memory_asked.pop(ticket, None)
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
            self._memory_asked.pop(ticket, None)
        return dropped


def unplaceable(memory_gib: int, gpus: tuple[int, ...]) -> str:
    """Why a memory request can never be placed, with the numbers.

    Example:
        >>> print(unplaceable(100, (80, 40)))
        asks for 100 GiB of GPU memory; the largest of this worker's GPUs has 80 GiB \
(GPU 0: 80 GiB, GPU 1: 40 GiB)
    """
    if not gpus:
        return (
            f"asks for {memory_gib} GiB of GPU memory, but this worker knows no GPU memory "
            "(no NVML, no --gpu-memory, no memory limit)"
        )
    each = ", ".join(f"GPU {position}: {gib} GiB" for position, gib in enumerate(gpus))
    return (
        f"asks for {memory_gib} GiB of GPU memory; the largest of this worker's GPUs has "
        f"{max(gpus)} GiB ({each})"
    )


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
