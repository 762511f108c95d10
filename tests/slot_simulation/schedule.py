"""What one simulation does, drawn from its seed: the steps, the server's events, the faults.

A schedule is plain data, printed in a failure report, so that a failing seed
says what happened before it is replayed.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, replace

from prefect_gpu_workers.slots.prefect_io import FIRST_LEASE_S

from .prefect_model import FaultRates

MAX_OUTAGE_S = FIRST_LEASE_S / 4 - 1.0


class Ending(enum.Enum):
    """How a GPU step's connection ends."""

    RELEASE = "release"  # asks for the release and waits for the answer
    CRASH = "crash"  # the process dies holding the slot: the connection drops
    GIVE_UP = "give up"  # stops waiting (timeout, cancellation) before its grant


@dataclass(frozen=True)
class StepPlan:
    name: str
    arrives_at: float
    occupy: int
    hold_s: float
    ending: Ending
    patience_s: float  # GIVE_UP: how long it waits
    memory_gib: int | None = None  # placed by memory on one of the worker's GPUs
    licence: bool = False  # also holds a seat of the licence limit


@dataclass(frozen=True)
class Placement:
    """The worker's GPUs (each one's GiB, the memory limit their sum) and a licence
    limit (0 seats: none) that steps hold with their grant."""

    gpus: tuple[int, ...]
    licence_seats: int


class EventKind(enum.Enum):
    RESTART = "restart"  # the server is down for a while; memory lease storage forgets all
    OUTAGE = "outage"  # the server is unreachable for a while, and keeps its leases
    RESIZE = "resize"  # an administrator changes the limit
    RECREATE = "recreate"  # an administrator deletes the limit and creates it again


@dataclass(frozen=True)
class ServerEvent:
    at: float
    kind: EventKind
    value: float  # seconds down (RESTART, OUTAGE), the new limit (RESIZE), or 0


@dataclass(frozen=True)
class Schedule:
    seed: int
    capacity: int
    lease_duration: float
    steps: tuple[StepPlan, ...]
    events: tuple[ServerEvent, ...]
    faults: FaultRates
    # Prefect's lease storage: "memory" forgets every lease in a restart, "file"
    # keeps them (PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE).
    lease_storage: str = "memory"
    # Steps placed by memory, with a licence held beside (None: slots alone).
    placement: Placement | None = None

    @property
    def busy_until(self) -> float:
        """When the last step arrives plus every step's hold: a bound on the work."""
        last = max((s.arrives_at for s in self.steps), default=0.0)
        return last + sum(s.hold_s for s in self.steps)

    def describe(self) -> str:
        restarts = any(e.kind is EventKind.RESTART for e in self.events)
        storage = ", file lease storage" if restarts and self.lease_storage == "file" else ""
        lines = [
            f"seed {self.seed}: limit {self.capacity}, leases of {self.lease_duration:.0f} s, "
            f"{len(self.steps)} steps, faults {self.faults}{storage}",
        ]
        if self.placement is not None:
            lines.append(
                f"  GPUs {list(self.placement.gpus)} GiB, licence of "
                f"{self.placement.licence_seats} seat(s)"
            )
        lines += [f"  t={e.at:7.2f} {e.kind.value} {e.value:g}" for e in self.events]
        lines += [
            f"  t={s.arrives_at:7.2f} {s.name} occupy={s.occupy} hold={s.hold_s:.2f} "
            f"{s.ending.value}"
            + (f" after {s.patience_s:.2f}" if s.ending is Ending.GIVE_UP else "")
            + (f" memory={s.memory_gib}" if s.memory_gib is not None else "")
            + (" +licence" if s.licence else "")
            for s in self.steps
        ]
        return "\n".join(lines)


def draw_schedule(seed: int, placement: bool = False) -> Schedule:
    """The schedule of ``seed``: small limits and bursts of steps, so they contend.

    Outages stay shorter than a quarter of the shortest lease: a broker that
    renews as it should never loses a live lease to the repossessor, so any
    repossession of one is a defect, not bad luck.

    ``placement``: the same schedule, its steps also asking for GPU memory on
    one or two small GPUs and some for a licence seat, drawn from a source of
    their own (each seed's slot schedule stays as it was).
    """
    rng = random.Random(seed)
    capacity = rng.randint(1, 4)
    lease_duration = rng.choice([60.0, 120.0, 300.0])
    horizon = rng.uniform(20.0, 240.0)
    steps = []
    for i in range(rng.randint(2, 14)):
        ending = rng.choices(list(Ending), weights=[6, 2, 2])[0]
        steps.append(
            StepPlan(
                name=f"step-{i}",
                arrives_at=round(rng.uniform(0.0, horizon), 3),
                occupy=rng.choices(range(1, capacity + 1), weights=[4] + [1] * (capacity - 1))[0],
                hold_s=round(rng.expovariate(1 / 20.0) + 0.01, 3),
                ending=ending,
                patience_s=round(rng.uniform(0.0, 30.0), 3),
            )
        )
    events = []
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        kind = rng.choice(list(EventKind))
        at = round(rng.uniform(0.0, horizon), 3)
        if kind is EventKind.RESIZE:
            value = float(rng.randint(1, 4))
        elif kind is EventKind.RECREATE:
            value = 0.0
        else:  # shorter than a quarter of the shortest lease the broker takes
            value = round(rng.uniform(0.5, MAX_OUTAGE_S), 3)
        events.append(ServerEvent(at, kind, value))
    level = rng.choice([0.0, 0.02, 0.08, 0.15])
    faults = FaultRates(
        refused=level / 2,
        error_before=level / 2,
        error_after=level,
        lost_answer=level / 2,
        slow=level / 2,
    )
    # From a source of its own: the draws above, and so every earlier seed's
    # schedule, stay as they were.
    storage = "file" if random.Random(seed ^ 0xF11E).random() < 0.3 else "memory"
    ordered = sorted(steps, key=lambda s: s.arrives_at)
    placed = None
    if placement:
        prng = random.Random(seed ^ 0x9E3)
        placed = Placement(
            tuple(prng.choice([8, 12, 16]) for _ in range(prng.randint(1, 2))),
            prng.choice([0, 1, 2]),
        )
        ordered = [
            replace(
                step,
                memory_gib=prng.randint(1, max(placed.gpus)) if prng.random() < 0.8 else None,
                licence=placed.licence_seats > 0 and prng.random() < 0.5,
            )
            for step in ordered
        ]
    return Schedule(
        seed,
        capacity,
        lease_duration,
        tuple(ordered),
        tuple(sorted(events, key=lambda e: e.at)),
        faults,
        storage,
        placed,
    )
