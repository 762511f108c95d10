"""The slot broker against a real Prefect server: order, fairness, reclaim, repair, fallback,
and no over-admission beside plain ``concurrency()`` holders."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from broker_harness import (
    BrokerThread,
    HolderProcess,
    active_slots,
    broker_env,
    create_limit,
    start_thread,
    unique_worker,
    wait_until,
)
from prefect.concurrency.sync import concurrency

from prefect_gpu_workers.naming import FLOW_RUN_ID_ENV, SLOT_BROKER_ENV
from prefect_gpu_workers.server import LocalPrefectServer
from prefect_gpu_workers.slots import client as limits
from prefect_gpu_workers.slots.client import gpu_slot
from prefect_gpu_workers.slots.prefect_io import FIRST_LEASE_S


class Steps:
    """GPU steps on threads of this process; each holds its slot until told to finish."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.order: list[str] = []
        self._finish: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, label: str, occupy: int = 1) -> None:
        finish = self._finish[label] = threading.Event()

        def step() -> None:
            with gpu_slot(occupy, worker_id=self.worker_id):
                with self._lock:
                    self.order.append(label)
                finish.wait(120)

        self._threads.append(start_thread(step))

    def holding(self, label: str) -> bool:
        with self._lock:
            return label in self.order

    def finish(self, label: str) -> None:
        self._finish[label].set()

    def join(self) -> None:
        for event in self._finish.values():
            event.set()
        for thread in self._threads:
            thread.join(60)


def _queued(broker: BrokerThread, name: str, count: int) -> bool:
    return broker.waiters(name) == count


@pytest.fixture
def fresh_fallback_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "_fallback_said", False)


def test_grants_follow_arrival_order(
    prefect_server: LocalPrefectServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = unique_worker()
    name = f"gpu:{worker}"
    create_limit(name, 1)
    with BrokerThread(worker) as broker:
        monkeypatch.setenv(SLOT_BROKER_ENV, broker.socket_path)
        steps = Steps(worker)
        try:
            steps.start("first")
            wait_until(lambda: steps.holding("first"), "the first step holds the slot")
            labels = [f"waiter-{i}" for i in range(4)]
            for queued, label in enumerate(labels, start=1):
                steps.start(label)
                # Each waiter is queued before the next one connects.
                wait_until(partial(_queued, broker, name, queued), f"{label} is queued")
            previous = "first"
            for label in labels:
                steps.finish(previous)
                wait_until(partial(steps.holding, label), f"{label} is granted")
                assert active_slots(name) == 1
                previous = label
            assert steps.order == ["first", *labels]
            # Each handoff passed the lease on: Prefect's count never dipped, no request.
            assert broker.describe()["leases_passed"] == len(labels)
        finally:
            steps.join()
        assert active_slots(name) == 0


def test_occupy_two_is_not_overtaken_by_later_occupy_one_steps(
    prefect_server: LocalPrefectServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = unique_worker()
    name = f"gpu:{worker}"
    create_limit(name, 2)
    with BrokerThread(worker) as broker:
        monkeypatch.setenv(SLOT_BROKER_ENV, broker.socket_path)
        steps = Steps(worker)
        try:
            for label in ("a", "b"):
                steps.start(label)
                wait_until(partial(steps.holding, label), f"{label} holds")
            steps.start("big", occupy=2)
            wait_until(lambda: broker.waiters(name) == 1, "the occupy=2 step is queued")
            steps.start("c")
            wait_until(lambda: broker.waiters(name) == 2, "c is queued")
            steps.start("d")
            wait_until(lambda: broker.waiters(name) == 3, "d is queued")

            steps.finish("a")
            wait_until(lambda: broker.stats(name)["held"] == 1, "a's slot is back")
            # One slot is free and c would fit in it, but the occupy=2 step came first.
            assert broker.stats(name) == {
                "capacity": 2, "held": 1, "waiters": 3, "waiting_slots": 4
            }  # fmt: skip
            assert active_slots(name) == 1

            steps.finish("b")
            wait_until(lambda: steps.holding("big"), "the occupy=2 step is granted")
            assert active_slots(name) == 2
            assert broker.stats(name)["waiters"] == 2

            steps.finish("big")
            wait_until(lambda: len(steps.order) == 5, "c and d are granted")
            assert steps.order[:3] == ["a", "b", "big"]
            assert sorted(steps.order[3:]) == ["c", "d"]
        finally:
            steps.join()
        assert active_slots(name) == 0


def test_sigkilled_holder_has_its_slot_reclaimed_at_once(
    prefect_server: LocalPrefectServer,
    holders: list[HolderProcess],
    record_property: Callable[[str, object], None],
) -> None:
    worker = unique_worker()
    name = f"gpu:{worker}"
    create_limit(name, 1)
    with BrokerThread(worker) as broker:
        env = broker_env(broker, prefect_server.api_url)
        victim = HolderProcess(worker, env)
        holders.append(victim)
        victim.wait_held()
        assert active_slots(name) == 1

        victim.proc.kill()  # SIGKILL: no release, no finally
        killed_at = time.monotonic()
        wait_until(lambda: active_slots(name) == 0, "the killed holder's slot is free")
        reclaim_s = time.monotonic() - killed_at
        # A killed holder with a step waiting behind it: the waiter gets the slot.
        victim = HolderProcess(worker, env)
        holders.append(victim)
        victim.wait_held()
        waiter = HolderProcess(worker, env)
        holders.append(waiter)
        wait_until(lambda: broker.waiters(name) == 1, "the second step waits")
        victim.proc.kill()
        killed_at = time.monotonic()
        waiter.wait_held()
        handoff_s = time.monotonic() - killed_at
        assert active_slots(name) == 1
        waiter.release()
        assert active_slots(name) == 0

    record_property("slot_reclaim_after_kill_s", round(reclaim_s, 3))
    record_property("handoff_after_kill_s", round(handoff_s, 3))
    print(f"\nslot_reclaim_after_kill_s={reclaim_s:.3f} handoff_after_kill_s={handoff_s:.3f}")


def test_count_is_repaired_after_a_server_restart_loses_the_leases(
    tmp_path: Path,
    holders: list[HolderProcess],
    record_property: Callable[[str, object], None],
) -> None:
    worker = unique_worker()
    name = f"gpu:{worker}"
    server = LocalPrefectServer(home=tmp_path / "prefect", lease_storage="memory")
    # Starts take minutes on a loaded 2-core machine (a fresh database is migrated).
    server.start(timeout_s=300)
    try:
        api = server.api_url
        create_limit(name, 2, api)
        # The broker's clock can jump ahead: a step that outlives its lease takes
        # no minutes of waiting (Prefect's shortest lease is 60 s).
        skew = [0.0]
        clock = lambda: time.monotonic() + skew[0]  # noqa: E731
        with BrokerThread(worker, api_url=api, maintenance_s=0.5, clock=clock) as broker:
            env = {**server.env(), **broker_env(broker, api)}
            early, late = HolderProcess(worker, env), HolderProcess(worker, env)
            holders += [early, late]
            early.wait_held()
            late.wait_held()
            assert active_slots(name, api) == 2

            server.stop()
            early.release()  # while the server is down: the broker keeps trying
            server.start(timeout_s=300)
            restarted_at = time.monotonic()
            # The database kept active_slots; the lost lease of `early` is repaired,
            # the live holder `late` stays counted.
            wait_until(lambda: active_slots(name, api) == 1, "early's slot is given back")
            repair_s = time.monotonic() - restarted_at

            # A renewal finds late's lease lost (410 within its duration: late's
            # lease is still the first one, of FIRST_LEASE_S, whose renewal is due
            # after a quarter of it) ...
            assert broker.broker is not None
            lease_s = broker.broker.lease_duration
            skew[0] = FIRST_LEASE_S / 2
            wait_until(
                lambda: any(h["lease_lost"] for h in broker.describe()["holders"]),
                "a renewal finds late's lease lost",
            )
            # ... and the step ends long after the lease's duration (issue 21, defect 2:
            # a probe then read the 410 as "expired" and gave nothing back, for good).
            skew[0] += 2 * lease_s
            late.release()
            assert active_slots(name, api) == 0, "a lost lease's release was a no-op"

            # Nothing leaked: a step needing both slots gets them, and gives them back.
            both = HolderProcess(worker, env, occupy=2)
            holders.append(both)
            both.wait_held()
            assert active_slots(name, api) == 2
            both.release()
            assert active_slots(name, api) == 0
    finally:
        server.stop()
    record_property("repair_after_restart_s", round(repair_s, 3))
    print(f"\nrepair_after_restart_s={repair_s:.3f}")


def test_without_a_broker_steps_poll_prefect_and_say_so_once(
    prefect_server: LocalPrefectServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    fresh_fallback_notice: None,
) -> None:
    worker = unique_worker()
    name = f"gpu:{worker}"
    create_limit(name, 1)
    # A socket path nobody listens on: the worker's broker is gone.
    monkeypatch.setenv(SLOT_BROKER_ENV, str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.WARNING, logger="prefect_gpu_workers.slots.client"):
        for _ in range(2):
            with gpu_slot(worker_id=worker):
                assert active_slots(name) == 1
            assert active_slots(name) == 0
    notices = [r for r in caplog.records if "no slot broker" in r.getMessage()]
    assert len(notices) == 1
    assert "gone.sock" in notices[0].getMessage()


def test_steps_waiting_when_the_broker_stops_fall_back_without_overlap(
    prefect_server: LocalPrefectServer,
    monkeypatch: pytest.MonkeyPatch,
    fresh_fallback_notice: None,
) -> None:
    worker = unique_worker()
    name = f"gpu:{worker}"
    create_limit(name, 1)
    intervals: dict[str, tuple[float, float]] = {}
    holding = threading.Event()
    finish = threading.Event()

    def step(label: str) -> None:
        with gpu_slot(worker_id=worker):
            start = time.monotonic()
            if label == "holder":
                holding.set()
                finish.wait(120)
            intervals[label] = (start, time.monotonic())

    broker = BrokerThread(worker)
    with broker:
        monkeypatch.setenv(SLOT_BROKER_ENV, broker.socket_path)
        holder = start_thread(step, "holder")
        assert holding.wait(60)
        waiter = start_thread(step, "waiter")
        wait_until(lambda: broker.waiters(name) == 1, "the waiter is queued")
    # The broker is gone: the waiter polls Prefect, where the holder's lease still counts.
    assert active_slots(name) == 1
    finish.set()  # the holder finds the broker gone and releases its lease itself
    holder.join(60)
    waiter.join(120)
    assert set(intervals) == {"holder", "waiter"}
    assert intervals["holder"][1] <= intervals["waiter"][0], "the waiter ran beside the holder"
    assert active_slots(name) == 0


def _peak_occupancy(intervals: list[tuple[float, float, int]]) -> int:
    events = sorted(
        [(start, 1, occupy) for start, _, occupy in intervals]
        + [(end, 0, -occupy) for _, end, occupy in intervals]
    )  # at equal times, ends (0) come before starts (1)
    peak = current = 0
    for _, _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def test_no_over_admission_beside_plain_concurrency_holders(
    prefect_server: LocalPrefectServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = unique_worker()
    name = f"gpu:{worker}"
    create_limit(name, 2)
    intervals: list[tuple[float, float, int, str]] = []
    lock = threading.Lock()

    def record(start: float, occupy: int, kind: str) -> None:
        time.sleep(0.2)  # the step's work
        with lock:
            intervals.append((start, time.monotonic(), occupy, kind))

    def broker_step(occupy: int) -> None:
        for _ in range(3):
            with gpu_slot(occupy, worker_id=worker):
                record(time.monotonic(), occupy, "broker")

    def plain_step() -> None:
        for _ in range(3):
            # Someone else's flow: Prefect's own concurrency(), no broker.
            with concurrency(name, occupy=1, strict=True):
                record(time.monotonic(), 1, "plain")

    with BrokerThread(worker) as broker:
        monkeypatch.setenv(SLOT_BROKER_ENV, broker.socket_path)
        threads = [start_thread(broker_step, occupy) for occupy in (1, 1, 2, 1)]
        threads += [start_thread(plain_step) for _ in range(2)]
        for thread in threads:
            thread.join(300)
        assert broker.stats(name)["held"] == 0
    assert sum(1 for *_, kind in intervals if kind == "plain") == 6
    assert sum(1 for *_, kind in intervals if kind == "broker") == 12
    peak = _peak_occupancy([(start, end, occupy) for start, end, occupy, _ in intervals])
    assert peak <= 2, f"{peak} slots in use at once on a limit of 2"
    assert active_slots(name) == 0


ASKER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(b'{"op": "acquire", "limit": "%s", "occupy": 1}\\n' % sys.argv[2].encode())
sock.settimeout(30)
lines = sock.makefile("rb")
print(lines.readline().decode().strip(), flush=True)
sys.stdin.readline()
"""


def ask(socket_path: str, limit: str, run_id: str | None) -> tuple[subprocess.Popen[str], str]:
    """A process (of flow run ``run_id``) that asks the broker for a slot; its first answer."""
    env = {k: v for k, v in os.environ.items() if k != FLOW_RUN_ID_ENV}
    if run_id is not None:
        env[FLOW_RUN_ID_ENV] = run_id
    proc = subprocess.Popen(
        [sys.executable, "-c", ASKER, socket_path, limit],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_only_processes_of_the_worker_s_runs_are_served_each_run_up_to_the_capacity(
    prefect_server: LocalPrefectServer,
) -> None:
    """Before: any process of the worker's user was served, and one run could fill the
    queue with as many requests as it liked."""
    worker = unique_worker()
    name = f"gpu:{worker}"
    create_limit(name, 2)
    ours, other = str(uuid.uuid4()), str(uuid.uuid4())
    asked: list[subprocess.Popen[str]] = []
    with BrokerThread(worker) as broker:
        assert broker.broker is not None
        broker.broker.runs_in_flight = lambda: {ours}
        try:
            answers = []
            for run_id in (ours, ours, ours, other, None):
                proc, answer = ask(broker.socket_path, name, run_id)
                asked.append(proc)
                answers.append(json.loads(answer))
        finally:
            for proc in asked:
                proc.kill()
                proc.wait()
    first, second, third, stranger, no_run = answers
    assert first["event"] == second["event"] == "granted"
    assert third["kind"] == "run_cap", third
    assert f"flow run {ours} holds or waits for 2 of {name}'s 2 slots" in third["message"]
    for refused in (stranger, no_run):
        assert refused["kind"] == "stranger", refused
        assert f"is not a flow run that worker {worker} executes" in refused["message"]
