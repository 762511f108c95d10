"""Memory placement in the slot broker's queue: each request on one GPU with room,
first in first served per GPU, never past a claimed GPU."""

from __future__ import annotations

import random

import pytest

from prefect_gpu_workers.slots.grants import GrantQueue, Unserviceable


def test_places_each_request_on_the_gpu_it_fits_most_tightly() -> None:
    queue = GrantQueue(capacity=8, gpus=(80, 80))
    queue.request(1, 1, memory_gib=40)
    queue.request(2, 1, memory_gib=8)
    queue.request(3, 1, memory_gib=40)
    assert queue.grant() == [1, 2, 3]
    # 2 goes beside 1 (the tighter hole), leaving GPU 1 whole for the next 40.
    assert [queue.placement(t) for t in (1, 2, 3)] == [0, 0, 1]
    assert queue.gpu_used == (48, 40)


def test_a_large_step_is_not_starved_by_a_stream_of_small_ones() -> None:
    queue = GrantQueue(capacity=16, gpus=(80,))
    for ticket in range(1, 10):  # nine 8 GiB steps: 72 GiB used
        queue.request(ticket, 1, memory_gib=8)
    assert len(queue.grant()) == 9
    queue.request(100, 1, memory_gib=40)  # waits for 40 GiB
    granted: list[int] = []
    next_small = 200
    for finished in range(1, 10):
        queue.request(next_small, 1, memory_gib=8)  # a later small one arrives
        next_small += 1
        queue.release(finished)
        granted += queue.grant()
    assert granted[0] == 100, "a freed 8 GiB hole must not go to a later 8 GiB step"
    assert queue.gpu_used[0] <= 80


def test_a_later_request_that_fits_on_another_gpu_starts_there() -> None:
    queue = GrantQueue(capacity=8, gpus=(80, 80))
    queue.request(1, 1, memory_gib=60)
    queue.request(2, 1, memory_gib=60)
    assert queue.grant() == [1, 2]
    queue.request(3, 1, memory_gib=40)  # fits nowhere: claims a GPU
    queue.request(4, 1, memory_gib=16)  # fits on the GPU 3 did not claim
    assert queue.grant() == [4]
    assert queue.placement(4) == 1  # both had 20 free; 3 claimed GPU 0, the lower one
    queue.release(1)
    assert queue.grant() == [3]
    assert queue.placement(3) == 0


def test_a_waiter_short_of_slots_stops_everyone_behind_it() -> None:
    queue = GrantQueue(capacity=2, gpus=(80,))
    queue.request(1, 2, memory_gib=8)
    assert queue.grant() == [1]
    queue.request(2, 1, memory_gib=8)  # room for its memory, none for its slot
    queue.request(3, 1)
    assert queue.grant() == []
    queue.release(1)
    assert queue.grant() == [2, 3]


def test_memory_larger_than_every_gpu_is_refused_with_the_numbers() -> None:
    queue = GrantQueue(capacity=4, gpus=(80, 40))
    with pytest.raises(
        Unserviceable, match=r"100 GiB .* has 80 GiB \(GPU 0: 80 GiB, GPU 1: 40 GiB\)"
    ):
        queue.request(1, 1, memory_gib=100)
    with pytest.raises(Unserviceable, match="knows no GPU memory"):
        GrantQueue(capacity=4).request(1, 1, memory_gib=1)
    assert queue.waiters == 0


def test_plain_requests_keep_their_lease_handoff_memory_requests_do_not() -> None:
    queue = GrantQueue(capacity=1, gpus=(80,))
    queue.request(1, 1)
    queue.request(2, 1)
    assert queue.grant() == [1]
    assert queue.heir(1) == 2
    queue.cancel(2)
    queue.request(3, 1, memory_gib=8)
    assert queue.heir(1) is None  # a placement holds memory a bare slot lease does not


def test_shrunk_gpus_drop_waiters_that_can_never_fit_and_keep_holders() -> None:
    queue = GrantQueue(capacity=4, gpus=(80,))
    queue.request(1, 1, memory_gib=60)
    queue.request(2, 1, memory_gib=70)
    assert queue.grant() == [1]
    assert queue.set_gpus((64,)) == [2]
    assert queue.gpu_used == (60,)
    queue.request(3, 1, memory_gib=8)
    assert queue.grant() == []  # 4 GiB left
    queue.release(1)
    assert queue.grant() == [3]


@pytest.mark.parametrize("seed", range(20))
def test_random_mixes_never_overfill_and_everyone_is_served(seed: int) -> None:
    """Fixed seeds, so the same schedules every run: invariants at every step."""
    rng = random.Random(seed)
    gpus = (80, 80)
    queue = GrantQueue(capacity=6, gpus=gpus)
    sizes = [8, 8, 8, 40, 24, 80]
    waiting: list[int] = []
    held: list[int] = []
    asked: dict[int, int] = {}
    for ticket in range(1, 301):
        asked[ticket] = rng.choice(sizes)
        queue.request(ticket, 1, memory_gib=asked[ticket])
        waiting.append(ticket)
        for granted in queue.grant():
            waiting.remove(granted)
            held.append(granted)
        if held and rng.random() < 0.6:
            queue.release(held.pop(rng.randrange(len(held))))
            for granted in queue.grant():
                waiting.remove(granted)
                held.append(granted)
        used = [0, 0]
        for holder in held:
            used[queue.placement(holder)] += asked[holder]  # type: ignore[index]
        assert tuple(used) == queue.gpu_used
        assert all(u <= cap for u, cap in zip(used, gpus, strict=True))
        assert queue.held_slots <= 6
    while held:  # drain: everyone still waiting is granted in the end
        queue.release(held.pop(0))
        for granted in queue.grant():
            waiting.remove(granted)
            held.append(granted)
    assert waiting == []
