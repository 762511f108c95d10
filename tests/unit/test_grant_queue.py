"""The slot broker's pure decisions: FIFO occupy-aware grants, release actions, intake."""

from __future__ import annotations

import pytest

from prefect_gpu_workers.slots.grants import (
    GrantQueue,
    Refusal,
    Unserviceable,
    admission,
    intake_open,
)
from prefect_gpu_workers.slots.leases import (
    LeaseState,
    ReleaseAction,
    classify_gone_lease,
    release_action,
)
from prefect_gpu_workers.slots.wire import decode, encode


def test_grants_in_arrival_order_up_to_capacity() -> None:
    queue = GrantQueue(capacity=2)
    for ticket in (1, 2, 3):
        queue.request(ticket, occupy=1)
    assert queue.grant() == [1, 2]
    assert (queue.held_slots, queue.waiters) == (2, 1)
    assert queue.release(2) == 1
    assert queue.grant() == [3]


def test_occupy_two_is_not_starved_by_a_stream_of_ones() -> None:
    queue = GrantQueue(capacity=2)
    queue.request(1, occupy=1)
    queue.request(2, occupy=1)
    assert queue.grant() == [1, 2]
    queue.request(3, occupy=2)
    next_ticket = 4
    granted_order: list[int] = []
    # A stream of occupy=1 requests keeps arriving; each finished holder frees one slot.
    for finished in (1, 2):
        queue.request(next_ticket, occupy=1)
        next_ticket += 1
        queue.release(finished)
        granted_order += queue.grant()
    assert granted_order == [3], "one free slot must not go to a later occupy=1 request"
    queue.release(3)
    assert queue.grant() == [4, 5]


def test_head_of_line_is_never_overtaken() -> None:
    queue = GrantQueue(capacity=3)
    queue.request(1, occupy=2)
    assert queue.grant() == [1]
    queue.request(2, occupy=2)
    queue.request(3, occupy=1)
    # One slot is free and ticket 3 would fit, but ticket 2 came first.
    assert queue.grant() == []
    queue.release(1)
    assert queue.grant() == [2, 3]


def test_cancelled_waiter_and_dropped_holder() -> None:
    queue = GrantQueue(capacity=1)
    queue.request(1, occupy=1)
    queue.request(2, occupy=1)
    queue.request(3, occupy=1)
    assert queue.grant() == [1]
    assert queue.cancel(2) == 0  # gave up while waiting: holds nothing
    assert queue.cancel(1) == 1  # its connection dropped while holding
    assert queue.grant() == [3]


def test_requests_that_can_never_fit_are_refused() -> None:
    queue = GrantQueue(capacity=2)
    with pytest.raises(Unserviceable):
        queue.request(1, occupy=3)
    with pytest.raises(ValueError, match="occupy"):
        queue.request(2, occupy=0)
    queue.request(3, occupy=1)
    with pytest.raises(ValueError, match="already"):
        queue.request(3, occupy=1)


def test_shrinking_capacity_drops_waiters_that_no_longer_fit_and_keeps_holders() -> None:
    queue = GrantQueue(capacity=4)
    queue.request(1, occupy=3)
    assert queue.grant() == [1]
    queue.request(2, occupy=3)
    queue.request(3, occupy=1)
    assert queue.resize(2) == [2]
    assert queue.held_slots == 3  # the holder keeps its slots
    assert queue.grant() == []  # but nothing more is granted past the new capacity
    queue.release(1)
    assert queue.grant() == [3]


def test_release_action_repairs_only_what_the_broker_granted() -> None:
    assert release_action(LeaseState.ALIVE, same_limit=True) is ReleaseAction.RELEASE_LEASE
    assert release_action(LeaseState.LOST, same_limit=True) is ReleaseAction.DECREMENT
    assert release_action(LeaseState.LOST, same_limit=False) is ReleaseAction.NOTHING
    assert release_action(LeaseState.EXPIRED, same_limit=True) is ReleaseAction.NOTHING
    assert release_action(LeaseState.UNKNOWN, same_limit=True) is ReleaseAction.RETRY


def test_a_gone_lease_renewed_within_its_duration_was_lost_not_expired() -> None:
    assert classify_gone_lease(10.0, lease_duration=300.0) is LeaseState.LOST
    assert classify_gone_lease(301.0, lease_duration=300.0) is LeaseState.EXPIRED


@pytest.mark.parametrize(
    ("capacity", "waiting_slots", "open_"),
    [(2, 0, True), (2, 1, True), (2, 2, False), (2, 5, False)],
)
def test_intake_closes_while_the_gpu_queue_holds_a_full_round(
    capacity: int, waiting_slots: int, open_: bool
) -> None:
    assert intake_open(capacity, waiting_slots) is open_


def test_wire_format_round_trips_and_rejects_garbage() -> None:
    message = {"op": "acquire", "limit": "gpu:w1", "occupy": 2, "holder": None}
    assert decode(encode(message)) == message
    assert encode(message).endswith(b"\n")
    with pytest.raises(ValueError, match="not a JSON object"):
        decode(b"[1, 2]\n")
    with pytest.raises(ValueError, match="too long"):
        decode(b"x" * 5000)


def test_the_heir_is_the_head_that_takes_exactly_the_leaving_slots() -> None:
    single = GrantQueue(1)
    single.request(10, 1)
    single.request(11, 1)
    assert single.grant() == [10]
    assert single.heir(10) == 11  # 11 takes exactly 10's slot: the lease can pass
    assert single.heir(11) is None  # a waiter has nothing to pass on
    assert single.heir(99) is None  # nor has an unknown ticket

    queue = GrantQueue(2)
    queue.request(1, 1)
    queue.request(2, 1)
    queue.request(3, 2)
    assert queue.grant() == [1, 2]
    assert queue.heir(1) is None  # the head wants 2 slots, ticket 1 leaves 1
    queue.cancel(1)
    queue.cancel(2)
    queue.request(4, 2)
    assert queue.grant() == [3]
    assert queue.heir(3) == 4  # 2 slots leave, the head wants 2

    shrunk = GrantQueue(2)
    shrunk.request(5, 2)
    shrunk.request(6, 2)
    assert shrunk.grant() == [5]
    shrunk.resize(1)  # 6 can never fit now: dropped, nobody inherits
    assert shrunk.heir(5) is None


def test_no_heir_while_the_others_still_hold_more_than_a_shrunk_capacity() -> None:
    """Simulation seed 192 (issue 21): 3 slots shrunk to 1 while two held one each.
    The leaving holder's lease went to the head, which could not be granted (the
    other holder still filled the capacity), and the other holder waited for
    Prefect's slot parked on that head: nobody ran again."""
    queue = GrantQueue(3)
    queue.request(1, 1)
    queue.request(2, 1)
    assert queue.grant() == [1, 2]
    queue.resize(1)
    queue.request(4, 1)
    assert queue.heir(2) is None  # 1 still holds the one slot there is
    queue.cancel(2)
    assert queue.grant() == []
    assert queue.heir(1) == 4  # the last one over: now it fits


@pytest.mark.parametrize(
    ("peer_run", "runs", "run_slots", "occupy", "expected"),
    [
        ("r1", {"r1"}, 0, 2, None),
        ("r1", {"r1"}, 1, 1, None),  # two steps of one run, one slot each: the capacity
        ("r1", {"r1"}, 2, 1, Refusal.RUN_CAP),  # a third would only keep other runs waiting
        ("r1", {"r1"}, 0, 3, Refusal.RUN_CAP),
        ("r2", {"r1"}, 0, 1, Refusal.STRANGER),  # a run this worker does not execute
        (None, {"r1"}, 0, 1, Refusal.STRANGER),  # a process of no flow run
        (None, set(), 0, 1, Refusal.STRANGER),
        (None, None, 0, 1, None),  # a broker alone: any process of its user
        ("r1", None, 2, 1, Refusal.RUN_CAP),  # the cap holds without the worker's list
    ],
)
def test_only_the_worker_s_runs_may_queue_and_each_up_to_the_capacity(
    peer_run: str | None,
    runs: set[str] | None,
    run_slots: int,
    occupy: int,
    expected: Refusal | None,
) -> None:
    assert admission(peer_run, runs, run_slots, occupy, capacity=2) is expected
