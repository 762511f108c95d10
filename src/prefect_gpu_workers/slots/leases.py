"""A Prefect lease as the broker knows it, and what to do with it: pure decisions.

Standard library only. :func:`release_action` decides how a finished holder's
slots go back to Prefect from what a probe of its lease said (the server may
have lost it in a restart, or taken it back when it expired); nothing here
guesses from elapsed time alone except :func:`classify_gone_lease`, which a
410 answer asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from uuid import UUID


@dataclass(frozen=True)
class Lease:
    id: UUID
    limit_id: UUID
    duration: float  # seconds it was taken or last renewed for
    # The broker's clock when the increment's answer came (the server took it
    # before): a limit read sent after this shows the limit the lease counts in.
    taken_at: float = 0.0


class LeaseState(Enum):
    """What renewing a Prefect lease just said about it."""

    ALIVE = "alive"  # the server knows it: releasing it decrements the limit
    LOST = "lost"  # 410 although renewed within its duration: a server restart forgot it
    EXPIRED = "expired"  # 410 after its duration without renewal: the server took it back
    UNKNOWN = "unknown"  # no answer (server down): ask again later


class ReleaseAction(Enum):
    RELEASE_LEASE = "release-lease"  # decrement-with-lease
    DECREMENT = "decrement"  # bare decrement of the holder's slots, by limit name
    NOTHING = "nothing"  # the slots are not counted in this limit any more
    RETRY = "retry"  # the server cannot be asked now


def release_action(state: LeaseState, same_limit: bool) -> ReleaseAction:
    """How to give a finished holder's slots back to Prefect.

    A lease the server lost (in-memory lease storage, server restarted) still
    counts in the limit's ``active_slots``, which live in the database, and
    releasing it is a silent no-op: the broker decrements by hand exactly the
    slots that holder held. It never decrements slots it did not grant, so a
    plain ``concurrency()`` holder is never uncounted by a repair. If the limit
    was deleted and recreated meanwhile (a new id), the old slots are not in it.

    Args:
        state: the lease probe's answer.
        same_limit: the limit still has the id the lease was taken on.
    """
    if state is LeaseState.UNKNOWN:
        return ReleaseAction.RETRY
    if state is LeaseState.ALIVE:
        return ReleaseAction.RELEASE_LEASE
    if state is LeaseState.EXPIRED:
        # The server's repossessor decrements expired leases itself.
        return ReleaseAction.NOTHING
    return ReleaseAction.DECREMENT if same_limit else ReleaseAction.NOTHING


def counts_nothing(lease: Lease, limit_id: UUID, read_at: float) -> bool:
    """Whether ``lease`` names a limit since deleted (its name now has ``limit_id``,
    read by a request sent at ``read_at``): it counts nothing, and its holder must
    take a lease of the limit as it is now.

    A lease taken after that read may name a newer limit than the read saw: it is
    judged by the next read, not this one.

    Example:
        >>> from uuid import UUID
        >>> old, new = UUID(int=1), UUID(int=2)
        >>> counts_nothing(Lease(UUID(int=9), old, 60.0, taken_at=5.0), new, read_at=10.0)
        True
        >>> counts_nothing(Lease(UUID(int=9), old, 60.0, taken_at=12.0), new, read_at=10.0)
        False
    """
    return lease.limit_id != limit_id and lease.taken_at < read_at


def classify_gone_lease(seconds_since_renewal: float, lease_duration: float) -> LeaseState:
    """A lease the server answers 410 for: lost (restart) or expired (repossessed).

    A lease renewed less than its duration ago cannot have expired, so the server
    forgot it; one not renewed for longer was (or will be) decremented by the
    server's repossessor, and decrementing it again would uncount someone else.
    """
    return LeaseState.LOST if seconds_since_renewal < lease_duration else LeaseState.EXPIRED


class LeaseHold(Enum):
    """What the broker knows of a holder's Prefect lease; its give-back follows from it.

    ``ALIVE -> LOST`` when a renewal or probe meets a 410 within the lease's
    duration; ``ALIVE -> RELEASE_SENT`` and ``LOST -> DECREMENT_SENT`` when a
    give-back's answer was an error or never came (it may have landed). A new
    lease (a handoff, a re-count) starts ``ALIVE`` again.
    """

    ALIVE = "alive"  # renewed as far as the broker knows: renew it, pass it on, probe then release
    LOST = "lost"  # a restart forgot it: never probed again; given back by a hand decrement
    RELEASE_SENT = "release-sent"  # a release may have landed: only a release is sent again
    DECREMENT_SENT = "decrement-sent"  # a decrement may have landed: nothing is sent again


def unclear_send(action: ReleaseAction) -> LeaseHold:
    """The hold after a give-back ``action`` whose answer did not say it did nothing.

    Example:
        >>> unclear_send(ReleaseAction.DECREMENT).value
        'decrement-sent'
    """
    if action is ReleaseAction.RELEASE_LEASE:
        return LeaseHold.RELEASE_SENT
    if action is ReleaseAction.DECREMENT:
        return LeaseHold.DECREMENT_SENT
    raise ValueError(f"{action} sends nothing")
