"""GPU steps placed by memory, and other limits held with the grant, against a real
Prefect server: placement, first in first served per GPU, a step that asks for
too much, a missing memory limit, the leases taken in one order (memory, ``also``
by name, the slot's last), and every lease of a killed step given back at once."""

from __future__ import annotations

import select
import socket

import pytest
from broker_harness import (
    BrokerThread,
    HolderProcess,
    active_slots,
    broker_env,
    create_limit,
    unique_worker,
    wait_until,
)
from prefect.concurrency.sync import concurrency

from prefect_gpu_workers.naming import SLOT_BROKER_ENV
from prefect_gpu_workers.server import LocalPrefectServer
from prefect_gpu_workers.slots.client import GpuLimitUnavailable, gpu_slot
from prefect_gpu_workers.slots.grants import WorkerGpu
from prefect_gpu_workers.slots.wire import decode, encode

TWO_80 = (WorkerGpu(0, "GPU-a", 80), WorkerGpu(1, "GPU-b", 80))


def _worker_limits(slots: int, memory_gib: int | None) -> tuple[str, str, str]:
    worker = unique_worker()
    create_limit(f"gpu:{worker}", slots)
    if memory_gib is not None:
        create_limit(f"gpu-memory:{worker}", memory_gib)
    return worker, f"gpu:{worker}", f"gpu-memory:{worker}"


def test_steps_are_placed_on_a_gpu_with_room_and_a_large_one_is_not_overtaken(
    prefect_server: LocalPrefectServer, holders: list[HolderProcess]
) -> None:
    worker, slot_limit, memory_limit = _worker_limits(slots=8, memory_gib=160)
    with BrokerThread(worker, gpus=TWO_80) as broker:
        env = broker_env(broker, prefect_server.api_url)

        def hold(memory: str) -> HolderProcess:
            holder = HolderProcess(worker, env, memory=memory)
            holders.append(holder)
            return holder

        first = hold("40GiB")
        assert first.wait_held() == "cuda:0"
        second = hold("40GiB")
        assert second.wait_held() == "cuda:0"  # the tighter hole, GPU 1 stays whole
        third = hold("40GiB")
        assert third.wait_held() == "cuda:1"
        assert (active_slots(slot_limit), active_slots(memory_limit)) == (3, 120)

        large = hold("48GiB")  # fits nowhere: claims GPU 1 (the most free, 40)
        wait_until(lambda: broker.waiters(slot_limit) == 1, "the 48 GiB step waits")
        small = hold("8GiB")  # would fit GPU 1's 40 GiB, but the 48 GiB step came first
        wait_until(lambda: broker.waiters(slot_limit) == 2, "the 8 GiB step waits behind it")

        first.release()  # GPU 0: 40 free; the 48 now claims GPU 0 (tie: the lower)
        assert small.wait_held() == "cuda:1", "a later step that fits another GPU starts there"
        second.release()  # GPU 0: 80 free
        assert large.wait_held() == "cuda:0"
        assert (active_slots(slot_limit), active_slots(memory_limit)) == (3, 96)
        assert broker.describe()["gpus"] == [
            {"position": 0, "uuid": "GPU-a", "memory_gib": 80, "placed_gib": 48},
            {"position": 1, "uuid": "GPU-b", "memory_gib": 80, "placed_gib": 48},
        ]
        for holder in (third, large, small):
            holder.release()
        assert (active_slots(slot_limit), active_slots(memory_limit)) == (0, 0)


def test_a_step_that_asks_for_more_than_any_gpu_fails_before_it_runs_with_the_numbers(
    prefect_server: LocalPrefectServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, slot_limit, memory_limit = _worker_limits(slots=4, memory_gib=160)
    with BrokerThread(worker, gpus=TWO_80) as broker:
        monkeypatch.setenv(SLOT_BROKER_ENV, broker.socket_path)
        ran = False
        with (
            pytest.raises(GpuLimitUnavailable) as refused,
            gpu_slot(memory="100GiB", worker_id=worker),
        ):
            ran = True
        assert not ran
        assert "asks for 100 GiB" in str(refused.value)
        assert "has 80 GiB (GPU 0: 80 GiB, GPU 1: 80 GiB)" in str(refused.value)
        assert (active_slots(slot_limit), active_slots(memory_limit)) == (0, 0)


def test_memory_splits_the_memory_limit_when_the_worker_knows_no_gpu_memory(
    prefect_server: LocalPrefectServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, slot_limit, memory_limit = _worker_limits(slots=4, memory_gib=48)
    with BrokerThread(worker, gpus=(WorkerGpu(0), WorkerGpu(1))) as broker:
        monkeypatch.setenv(SLOT_BROKER_ENV, broker.socket_path)
        with gpu_slot(memory="24GiB", worker_id=worker) as grant:
            assert (grant.device, grant.memory_gib, str(grant)) == ("cuda:0", 24, slot_limit)
            assert active_slots(memory_limit) == 24
        with (
            pytest.raises(GpuLimitUnavailable, match="largest of this worker's GPUs has 24 GiB"),
            gpu_slot(memory="25GiB", worker_id=worker),
        ):
            pass


def test_a_missing_memory_limit_fails_closed(
    prefect_server: LocalPrefectServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, slot_limit, memory_limit = _worker_limits(slots=2, memory_gib=None)
    with BrokerThread(worker, gpus=TWO_80) as broker:
        monkeypatch.setenv(SLOT_BROKER_ENV, broker.socket_path)
        with (
            pytest.raises(GpuLimitUnavailable, match=f"{memory_limit}.*does not exist"),
            gpu_slot(memory="8GiB", worker_id=worker),
        ):
            pass
        # The broker refuses it too, for a step that skipped the check.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(broker.socket_path)
            sock.sendall(encode({"op": "acquire", "limit": slot_limit, "memory_gib": 8}))
            answer = decode(sock.makefile("rb").readline())
        assert answer["kind"] == "limit_unusable"
        assert memory_limit in answer["message"]
        assert active_slots(slot_limit) == 0


def test_leases_are_taken_memory_first_also_by_name_slot_last_and_all_given_back(
    prefect_server: LocalPrefectServer, holders: list[HolderProcess]
) -> None:
    worker, slot_limit, memory_limit = _worker_limits(slots=4, memory_gib=160)
    suffix = unique_worker()
    licence_a, licence_b = f"lic-a-{suffix}", f"lic-b-{suffix}"
    create_limit(licence_a, 1)
    create_limit(licence_b, 1)
    with BrokerThread(worker, gpus=TWO_80) as broker:
        env = broker_env(broker, prefect_server.api_url)
        with concurrency(licence_a, occupy=1, strict=True):  # someone else holds licence a
            step = HolderProcess(worker, env, memory="8GiB", also={licence_b: 1, licence_a: 1})
            holders.append(step)
            wait_until(
                lambda: active_slots(memory_limit) == 8,
                "the step holds its memory and waits for licence a",
            )
            # One order: memory, licence a, licence b, the slot. Neither b nor the
            # slot is held while a is waited for.
            assert step.proc.poll() is None
            assert (active_slots(licence_b), active_slots(slot_limit)) == (0, 0)
        assert step.wait_held() == "cuda:0"
        assert (active_slots(licence_a), active_slots(licence_b)) == (1, 1)
        step.proc.kill()  # every lease of the grant comes back at once
        step.proc.wait(30)
        wait_until(
            lambda: (
                [active_slots(n) for n in (slot_limit, memory_limit, licence_a, licence_b)]
                == [0, 0, 0, 0]
            ),
            "the killed step's four leases are given back",
            timeout_s=10,
        )


def test_workers_sharing_licences_never_deadlock_and_never_exceed_them(
    prefect_server: LocalPrefectServer, holders: list[HolderProcess]
) -> None:
    """Two workers, each with two steps asking for both licences in opposite orders:
    taken in name order by both brokers, every step is served and nobody waits in
    a circle."""
    suffix = unique_worker()
    licences = [f"seat-a-{suffix}", f"seat-b-{suffix}"]
    for name in licences:
        create_limit(name, 1)
    workers = [_worker_limits(slots=2, memory_gib=80) for _ in range(2)]
    with (
        BrokerThread(workers[0][0], gpus=TWO_80[:1]) as first,
        BrokerThread(workers[1][0], gpus=TWO_80[:1]) as second,
    ):
        steps = []
        for (worker, _, _), broker in zip(workers, (first, second), strict=True):
            env = broker_env(broker, prefect_server.api_url)
            for also in ({licences[0]: 1, licences[1]: 1}, {licences[1]: 1, licences[0]: 1}):
                step = HolderProcess(worker, env, memory="8GiB", also=also)
                holders.append(step)
                steps.append(step)
        held: set[HolderProcess] = set()

        def holding() -> list[HolderProcess]:
            held.update(step for step in steps if step not in held and _says_held(step))
            return [step for step in steps if step in held]

        while steps:  # one at a time holds both seats; each releases in turn
            wait_until(lambda: bool(holding()), "a step holds both seats")
            assert len(holding()) == 1
            assert [active_slots(name) for name in licences] == [1, 1]
            step = holding()[0]
            step.release()
            steps.remove(step)
        assert [active_slots(name) for name in licences] == [0, 0]


def _says_held(step: HolderProcess) -> bool:
    """Whether ``step`` has printed ``held`` (a look, never a wait: it may still wait)."""
    assert step.proc.stdout is not None
    readable, _, _ = select.select([step.proc.stdout], [], [], 0)
    if not readable:
        return False
    line = step.proc.stdout.readline()
    assert line.startswith("held"), line
    return True
