"""Leader election (pgw_operator.leader): the pure decision, the state, the loop.

The loop runs against an in-memory Lease store that behaves as the API server
does for what election uses (resourceVersion checks: 409 on a stale write or
a second create, 404 on a missing object), in virtual time: sleeps advance a
clock that the test drives, and the blocking calls run inline. One test hangs
a call for real, with sub-second durations.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pgw_operator import leader, metrics
from pgw_operator.__main__ import leader_settings_of, main, parse_args
from pgw_operator.errors import KubernetesError
from pgw_operator.leader import (
    Acquire,
    Create,
    Leadership,
    LeaderState,
    LeaseRecord,
    LeaseSettings,
    Renew,
    Seen,
    Standby,
    decide,
    lease_body,
    observe,
    record_of,
    record_to_write,
    released,
    run_election,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def settings(identity: str = "pod-a", /, **timing: float) -> LeaseSettings:
    return LeaseSettings(
        "pgw-operator",
        "pgw-system",
        identity,
        lease_duration_s=timing.get("lease_duration_s", 15),
        renew_deadline_s=timing.get("renew_deadline_s", 10),
        retry_period_s=timing.get("retry_period_s", 2),
    )


# --- settings ---------------------------------------------------------------------------


def test_settings_default_to_client_go_s_timing() -> None:
    s = settings()
    assert (s.lease_duration_s, s.renew_deadline_s, s.retry_period_s) == (15.0, 10.0, 2.0)
    assert s.lease_ref == "pgw-system/pgw-operator"
    short = settings(lease_duration_s=4.2, renew_deadline_s=3, retry_period_s=1)
    assert short.lease_duration_seconds == 5  # whole seconds, never shorter


@pytest.mark.parametrize(
    ("timing", "message"),
    [
        ({"renew_deadline_s": 15}, "renew deadline (15.0 s) must be shorter than the lease"),
        ({"renew_deadline_s": 20}, "renew deadline (20.0 s) must be shorter than the lease"),
        ({"retry_period_s": 10}, "retry period (10.0 s) must be shorter than the renew deadline"),
        ({"retry_period_s": 0}, "the retry period must be positive"),
        ({"lease_duration_s": -1}, "the lease duration must be positive"),
    ],
)
def test_settings_refuse_timing_out_of_order(timing: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=r"^the") as info:
        settings(**timing)
    assert message in str(info.value)


@pytest.mark.parametrize("empty", ["name", "namespace", "identity"])
def test_settings_refuse_an_empty_name(empty: str) -> None:
    fields = {"name": "n", "namespace": "ns", "identity": "me", empty: ""}
    with pytest.raises(ValueError, match=f"the lease {empty} must not be empty"):
        LeaseSettings(fields["name"], fields["namespace"], fields["identity"])


# --- the decision -----------------------------------------------------------------------


def held(holder: str, duration: int = 15, **more: Any) -> LeaseRecord:
    return LeaseRecord(holder, duration, T0, T0, **more)


def test_no_lease_is_created() -> None:
    assert decide(None, "pod-a", now=0.0) == Create()


def test_a_lease_held_by_another_is_waited_for_until_it_expires() -> None:
    seen = Seen(held("pod-b"), since=100.0)
    assert decide(seen, "pod-a", now=100.0) == Standby("pod-b", 15.0)
    assert decide(seen, "pod-a", now=114.5) == Standby("pod-b", 0.5)
    # Expired exactly lease duration after it was last seen to change.
    assert decide(seen, "pod-a", now=115.0) == Acquire(previous_holder="pod-b")
    assert decide(seen, "pod-a", now=1000.0) == Acquire(previous_holder="pod-b")


def test_a_lease_held_by_me_is_renewed_even_when_expired() -> None:
    """A restart of the same pod (same identity): its old process is gone."""
    assert decide(Seen(held("pod-a"), since=0.0), "pod-a", now=5.0) == Renew()
    assert decide(Seen(held("pod-a"), since=0.0), "pod-a", now=500.0) == Renew()


def test_a_lease_with_no_holder_is_released_and_taken_at_once() -> None:
    for record in (LeaseRecord(), released(held("pod-b"), T0), held("", duration=15)):
        assert decide(Seen(record, since=100.0), "pod-a", now=100.0) == Acquire("")


def test_the_holder_s_duration_counts_not_mine() -> None:
    seen = Seen(held("pod-b", duration=60), since=0.0)
    assert isinstance(decide(seen, "pod-a", now=30.0), Standby)  # my default is 15 s
    assert decide(Seen(held("pod-b", duration=0), since=0.0), "pod-a", now=0.0) == Acquire("pod-b")


def test_expiry_is_by_my_clock_since_i_saw_a_change_never_by_renew_time() -> None:
    """renewTime comes from the holder's clock: skewed either way, it decides nothing."""
    past = replace(held("pod-b"), renew_time=T0 - timedelta(days=1))  # holder's clock behind
    assert isinstance(decide(Seen(past, since=50.0), "pod-a", now=51.0), Standby)
    future = replace(held("pod-b"), renew_time=T0 + timedelta(days=1))  # holder's clock ahead
    assert decide(Seen(future, since=50.0), "pod-a", now=65.0) == Acquire("pod-b")


def test_a_read_keeps_the_time_first_seen_while_the_record_is_the_same() -> None:
    first = observe(None, held("pod-b", resource_version="1"), now=10.0)
    # Another write of the object (a label) changed the resourceVersion only.
    same = observe(first, held("pod-b", resource_version="2"), now=14.0)
    assert (same.since, same.record.resource_version) == (10.0, "2")
    renewed = observe(same, replace(held("pod-b"), renew_time=T0 + timedelta(seconds=2)), 16.0)
    assert renewed.since == 16.0
    # A renewal pushes expiry out from when it was seen.
    assert decide(renewed, "pod-a", now=30.0) == Standby("pod-b", 1.0)


def test_what_each_decision_writes() -> None:
    s = settings("pod-a", lease_duration_s=15)
    t1 = T0 + timedelta(minutes=5)
    old = LeaseRecord("pod-b", 15, T0, T0, transitions=3, resource_version="41")
    taken = record_to_write(Acquire("pod-b"), old, s, t1)
    assert taken == LeaseRecord("pod-a", 15, t1, t1, transitions=4)
    assert taken.resource_version == "41"  # the write is conditional on what was read
    mine = LeaseRecord("pod-a", 15, T0, T0, transitions=3, resource_version="42")
    assert record_to_write(Renew(), mine, s, t1) == LeaseRecord("pod-a", 15, T0, t1, 3)
    created = record_to_write(Create(), None, s, t1)
    assert created == LeaseRecord("pod-a", 15, t1, t1, transitions=0)
    assert created.resource_version == ""


def test_a_release_clears_the_holder_and_keeps_the_count() -> None:
    t1 = T0 + timedelta(seconds=30)
    mine = LeaseRecord("pod-a", 15, T0, T0, transitions=3, resource_version="42")
    gone = released(mine, t1)
    assert gone == LeaseRecord("", 1, t1, t1, transitions=3)
    assert gone.resource_version == "42"


# --- the Lease object -------------------------------------------------------------------


def test_a_record_round_trips_through_the_lease_object() -> None:
    at = T0 + timedelta(microseconds=7)
    record = LeaseRecord("pod-a", 15, T0, at, transitions=2, resource_version="9")
    body = lease_body("pgw-system", "pgw-operator", record)
    assert body["metadata"] == {
        "name": "pgw-operator",
        "namespace": "pgw-system",
        "resourceVersion": "9",
    }
    # MicroTime: always six fraction digits (isoformat drops them at .000000).
    assert body["spec"] == {
        "holderIdentity": "pod-a",
        "leaseDurationSeconds": 15,
        "acquireTime": "2025-03-01T12:00:00.000000Z",
        "renewTime": "2025-03-01T12:00:00.000007Z",
        "leaseTransitions": 2,
    }
    read = record_of(body)
    assert read == record
    assert read.resource_version == "9"


def test_a_released_or_empty_lease_reads_as_no_holder() -> None:
    body = lease_body("ns", "n", released(held("pod-a"), T0))
    assert "holderIdentity" not in body["spec"]  # as client-go leaves it
    assert record_of(body).holder == ""
    assert record_of({"metadata": {"resourceVersion": "3"}}) == LeaseRecord()
    assert record_of({"spec": {"renewTime": "yesterday"}}).renew_time is None


# --- Leadership -------------------------------------------------------------------------


def gauge() -> float:
    (metric,) = metrics.LEADER.collect()
    return float(metric.samples[0].value)


def test_without_election_the_process_always_leads() -> None:
    leadership = Leadership.always()
    assert leadership.is_leading
    assert leadership.state is LeaderState.LEADING
    assert gauge() == 1
    asyncio.run(asyncio.wait_for(leadership.wait_leading(), timeout=1))


def test_wait_leading_returns_once_it_leads() -> None:
    async def scenario() -> list[str]:
        leadership = Leadership("pod-a")
        assert gauge() == 0
        order: list[str] = []

        async def writer() -> None:
            await leadership.wait_leading()
            order.append("write")

        task = asyncio.create_task(writer())
        await asyncio.sleep(0.01)
        assert not task.done()
        order.append("elected")
        leadership.become(LeaderState.LEADING)
        await asyncio.wait_for(task, timeout=1)
        assert gauge() == 1
        return order

    assert asyncio.run(scenario()) == ["elected", "write"]


def test_lost_and_released_are_final() -> None:
    leadership = Leadership("pod-a")
    leadership.become(LeaderState.LEADING)
    leadership.become(LeaderState.LOST)
    assert not leadership.is_leading
    assert gauge() == 0
    with pytest.raises(RuntimeError, match="cannot go from lost to leading"):
        leadership.become(LeaderState.LEADING)
    stopped = Leadership("pod-b")
    stopped.become(LeaderState.RELEASED)
    with pytest.raises(RuntimeError, match="cannot go from released to leading"):
        stopped.become(LeaderState.LEADING)
    with pytest.raises(RuntimeError, match="cannot go from standby to lost"):
        Leadership("pod-c").become(LeaderState.LOST)


def test_a_lost_process_waits_forever() -> None:
    async def scenario() -> None:
        leadership = Leadership("pod-a")
        leadership.become(LeaderState.LEADING)
        leadership.become(LeaderState.LOST)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(leadership.wait_leading(), timeout=0.05)

    asyncio.run(scenario())


# --- the loop, in virtual time -----------------------------------------------------------


def conflict(what: str) -> KubernetesError:
    return KubernetesError("KubernetesApiError", f"{what}: HTTP 409 Conflict", 409)


@dataclass
class FakeLeases:
    """One Lease store as the API server keeps it: resourceVersion checked on every write."""

    stored: LeaseRecord | None = None
    version: int = 0
    writes: list[tuple[str, LeaseRecord]] = field(default_factory=list)

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self.version += 1
        self.stored = replace(record, resource_version=str(self.version))
        return self.stored

    def read(self, namespace: str, name: str) -> LeaseRecord | None:
        return self.stored

    def create(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        if self.stored is not None:
            raise conflict("create Lease: AlreadyExists")
        self.writes.append(("create", record))
        return self._store(record)

    def replace(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        if self.stored is None:
            raise KubernetesError("KubernetesApiError", "update Lease: HTTP 404", 404)
        if record.resource_version != self.stored.resource_version:
            raise conflict("update Lease")
        self.writes.append(("replace", record))
        return self._store(record)


@dataclass
class Candidate:
    """One replica's view of the store: its calls can be cut off (a partition, a crash)."""

    store: FakeLeases
    identity: str
    cut_off: bool = False
    calls: int = 0

    def _check(self) -> None:
        self.calls += 1
        if self.cut_off:
            raise KubernetesError("KubernetesApiUnreachable", "connection refused")

    def read(self, namespace: str, name: str) -> LeaseRecord | None:
        self._check()
        return self.store.read(namespace, name)

    def create(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        self._check()
        return self.store.create(namespace, name, record)

    def replace(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        self._check()
        return self.store.replace(namespace, name, record)


class InlineExecutor(Executor):
    """Runs each call at once, in the loop's thread: virtual time needs no real threads."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


class VirtualClock:
    """Sleeps wait for :meth:`run_until` to move time to them; nothing reads the wall clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, asyncio.Future[None] | Callable[[], object]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.now)

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + seconds, next(self._seq), future))
        await future

    def at(self, when: float, action: Callable[[], object]) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), action))

    async def settle(self) -> None:
        for _ in range(50):  # every ready task runs until it sleeps again
            await asyncio.sleep(0)

    async def run_until(self, end: float) -> None:
        await self.settle()
        while self._timers and self._timers[0][0] <= end:
            when, _, timer = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if isinstance(timer, asyncio.Future):
                if not timer.done():
                    timer.set_result(None)
            else:
                timer()
            await self.settle()
        self.now = end


@dataclass
class Replica:
    identity: str
    api: Candidate
    leadership: Leadership
    lost: list[tuple[float, str]]
    task: asyncio.Task[None]


@dataclass
class World:
    clock: VirtualClock
    store: FakeLeases
    timing: dict[str, float]
    replicas: dict[str, Replica] = field(default_factory=dict)
    # (virtual time, identity) of each change of holder, as the store saw it
    log: list[tuple[float, str]] = field(default_factory=list)

    def start(self, identity: str) -> Replica:
        api = Candidate(self.store, identity)
        leadership = Leadership(identity)
        lost: list[tuple[float, str]] = []

        def on_lost(reason: str) -> None:
            assert not leadership.is_leading, "it must stop acting before it is told to exit"
            lost.append((self.clock.now, reason))

        task = asyncio.create_task(
            run_election(
                settings(identity, **self.timing),
                leadership,
                api=api,
                on_lost=on_lost,
                clock=self.clock,
                executor=InlineExecutor(),
            )
        )
        replica = Replica(identity, api, leadership, lost, task)
        self.replicas[identity] = replica
        return replica

    def leaders(self) -> list[str]:
        return [r.identity for r in self.replicas.values() if r.leadership.is_leading]

    def holder(self) -> str | None:
        return self.store.stored.holder if self.store.stored else None

    async def stop(self, identity: str) -> None:
        task = self.replicas[identity].task
        task.cancel()
        await self.clock.settle()
        assert task.done()


def in_world(scenario: Callable[[World], Any], **timing: float) -> Any:
    async def main() -> Any:
        world = World(VirtualClock(), FakeLeases(), timing)
        try:
            return await scenario(world)
        finally:
            for replica in world.replicas.values():
                replica.task.cancel()
            await world.clock.settle()

    return asyncio.run(main())


def test_the_first_candidate_creates_the_lease_and_renews_it_every_retry_period() -> None:
    async def scenario(world: World) -> None:
        a = world.start("pod-a")
        await world.clock.run_until(0.0)
        assert a.leadership.is_leading
        assert world.store.writes[0] == ("create", LeaseRecord("pod-a", 15, T0, T0, 0))
        await world.clock.run_until(10.0)
        # Created at 0, renewed at 2, 4, 6, 8, 10: same acquireTime, no transition.
        assert [kind for kind, _ in world.store.writes] == ["create"] + ["replace"] * 5
        stored = world.store.stored
        assert stored == LeaseRecord("pod-a", 15, T0, T0 + timedelta(seconds=10), 0)
        # One read, the create; then the leader renews what it wrote, reading nothing.
        assert a.api.calls == 1 + 1 + 5

    in_world(scenario)


def test_exactly_one_of_two_leads_and_the_standby_takes_over_a_dead_leader() -> None:
    async def scenario(world: World) -> None:
        a, b = world.start("pod-a"), world.start("pod-b")
        await world.clock.run_until(20.0)
        assert world.leaders() == ["pod-a"]  # the other's create met 409, re-read, waits
        assert b.leadership.state is LeaderState.STANDBY
        # SIGKILL: no release, no more renewals.
        a.api.cut_off = True
        killed_at = 21.0
        world.clock.at(killed_at, a.task.cancel)
        for t in range(22, 40):
            await world.clock.run_until(float(t))
            if b.leadership.is_leading:
                break
        assert b.leadership.is_leading
        took = world.clock.now - killed_at
        # The last renewal was at 20, seen by b at 20 or at its next poll (22):
        # it takes over a lease duration after that.
        assert 15.0 - 1.0 <= took <= 15.0 + 2.0, took
        stored = world.store.stored
        assert stored is not None
        assert (stored.holder, stored.transitions) == ("pod-b", 1)
        assert stored.acquire_time == T0 + timedelta(seconds=world.clock.now)

    in_world(scenario)


def test_a_leader_stopped_gracefully_releases_and_the_standby_leads_at_its_next_poll() -> None:
    async def scenario(world: World) -> None:
        a, _ = world.start("pod-a"), world.start("pod-b")
        await world.clock.run_until(7.0)
        assert world.leaders() == ["pod-a"]
        await world.stop("pod-a")  # SIGTERM: kopf stopped, then the election is cancelled
        assert a.leadership.state is LeaderState.RELEASED
        assert world.holder() == ""
        await world.clock.run_until(7.0 + 2.0)
        assert world.leaders() == ["pod-b"]
        assert world.store.stored is not None
        assert world.store.stored.transitions == 1
        assert a.lost == []

    in_world(scenario)


def test_a_leader_that_cannot_renew_within_the_deadline_has_lost_and_exits() -> None:
    async def scenario(world: World) -> None:
        a, _ = world.start("pod-a"), world.start("pod-b")
        await world.clock.run_until(4.0)
        assert world.leaders() == ["pod-a"]
        a.api.cut_off = True  # the API server is unreachable from pod-a only
        await world.clock.run_until(30.0)
        ((when, reason),) = a.lost  # once
        assert when == 4.0 + 10.0  # last renewal at 4, deadline 10 s
        assert a.leadership.state is LeaderState.LOST
        assert "lost the leadership of lease pgw-system/pgw-operator" in reason
        assert "within the renew deadline (10 s)" in reason
        assert "last error: connection refused" in reason
        assert a.task.done()  # the loop ends; the process would be gone already
        # The standby waited the whole lease duration after the last renewal it saw:
        # the old leader had stopped 5 s before it started.
        assert world.leaders() == ["pod-b"]
        taken = next(record for _, record in world.store.writes if record.holder == "pod-b")
        assert taken.acquire_time is not None
        assert taken.acquire_time >= T0 + timedelta(seconds=when + 5.0)

    in_world(scenario)


def test_a_leader_that_finds_another_holder_stops_at_once() -> None:
    async def scenario(world: World) -> None:
        a = world.start("pod-a")
        await world.clock.run_until(3.0)
        # Someone (an admin, a misconfigured twin) writes the lease over it.
        stored = world.store.stored
        assert stored is not None
        world.store._store(replace(stored, holder="intruder"))
        await world.clock.run_until(4.0)
        ((when, reason),) = a.lost
        assert when == 4.0  # at its next renewal: the 409, the read, the verdict
        assert "the lease is now held by intruder" in reason

    in_world(scenario)


def test_a_restarted_pod_with_the_same_identity_leads_again_at_once() -> None:
    async def scenario(world: World) -> None:
        world.store._store(LeaseRecord("pod-a", 15, T0, T0, transitions=2))
        a = world.start("pod-a")
        await world.clock.run_until(0.0)
        assert a.leadership.is_leading
        assert world.store.stored is not None
        assert world.store.stored.transitions == 2  # a renewal, not a transition

    in_world(scenario)


def test_a_deleted_lease_is_created_again_by_its_leader() -> None:
    async def scenario(world: World) -> None:
        a = world.start("pod-a")
        await world.clock.run_until(3.0)
        world.store.stored = None  # kubectl delete lease
        await world.clock.run_until(4.0)
        assert a.leadership.is_leading
        assert world.holder() == "pod-a"
        assert a.lost == []

    in_world(scenario)


def test_a_standby_that_cannot_reach_the_api_server_keeps_trying_and_never_leads() -> None:
    async def scenario(world: World) -> None:
        b = world.start("pod-b")
        b.api.cut_off = True
        await world.clock.run_until(60.0)
        assert b.leadership.state is LeaderState.STANDBY
        assert b.lost == []
        assert b.api.calls == 31  # every retry period
        b.api.cut_off = False
        await world.clock.run_until(62.0)
        assert b.leadership.is_leading

    in_world(scenario)


def test_a_short_lease_fails_over_within_its_duration(caplog: pytest.LogCaptureFixture) -> None:
    """The timing the failover cluster test uses (4/3/1 s)."""
    caplog.set_level(logging.INFO, logger="pgw_operator.leader")

    async def scenario(world: World) -> None:
        a, _ = world.start("pod-a"), world.start("pod-b")
        await world.clock.run_until(5.5)
        a.api.cut_off = True
        a.task.cancel()
        await world.clock.run_until(5.5 + 4.0 + 1.0)
        assert world.leaders() == ["pod-b"]

    in_world(scenario, lease_duration_s=4, renew_deadline_s=3, retry_period_s=1)
    messages = [r.getMessage() for r in caplog.records]
    assert any("standby: lease pgw-system/pgw-operator is held by pod-a" in m for m in messages)
    assert any(
        "leading: lease pgw-system/pgw-operator is held by pod-b "
        "(took it over from pod-a, whose lease expired; transitions: 1)" in m
        for m in messages
    ), messages


# --- a call that hangs, in real time ---------------------------------------------------


def test_a_renewal_that_hangs_loses_at_the_deadline_not_when_the_call_returns() -> None:
    store = FakeLeases()
    release = threading.Event()

    class Hanging(Candidate):
        def replace(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
            release.wait(5)  # a TCP connection that stopped answering
            return super().replace(namespace, name, record)

    async def scenario() -> tuple[float, list[str], Leadership]:
        leadership = Leadership("pod-a")
        lost: list[str] = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        election = run_election(
            settings("pod-a", lease_duration_s=0.6, renew_deadline_s=0.4, retry_period_s=0.1),
            leadership,
            api=Hanging(store, "pod-a"),
            on_lost=lost.append,
        )
        await asyncio.wait_for(election, timeout=3)
        return loop.time() - started, lost, leadership

    try:
        took, lost, leadership = asyncio.run(scenario())
    finally:
        release.set()
    assert leadership.state is LeaderState.LOST
    assert len(lost) == 1
    assert "within the renew deadline (0.4 s)" in lost[0]
    assert took < 1.5, took


# --- the default on_lost ----------------------------------------------------------------


def test_losing_exits_the_process_at_once_with_its_own_status(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    with caplog.at_level(logging.ERROR, logger="pgw_operator.leader"):
        leader.exit_process("lost the leadership of lease ns/n: why")
    assert exits == [leader.LOST_EXIT_CODE] != [0]
    assert "lost the leadership of lease ns/n: why" in caplog.text


# --- the command line -------------------------------------------------------------------


@pytest.fixture
def pod_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No downward-API variables, whatever the environment running the tests has."""
    for name in ("POD_NAME", "POD_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_leader_elect_there_is_no_election(pod_env: pytest.MonkeyPatch) -> None:
    assert leader_settings_of(parse_args([])) is None


def test_leader_elect_takes_the_pod_s_name_and_namespace_from_the_downward_api(
    pod_env: pytest.MonkeyPatch,
) -> None:
    pod_env.setenv("POD_NAME", "pgw-5d9c-x2")
    pod_env.setenv("POD_NAMESPACE", "pgw-system")
    got = leader_settings_of(parse_args(["--leader-elect"]))
    assert got == LeaseSettings("prefect-gpu-workers-operator", "pgw-system", "pgw-5d9c-x2")
    flags = [
        "--leader-elect", "--leader-elect-lease-name=other", "--leader-elect-namespace=ops",
        "--leader-elect-identity=me", "--leader-elect-lease-duration=4",
        "--leader-elect-renew-deadline=3", "--leader-elect-retry-period=1",
    ]  # fmt: skip
    assert leader_settings_of(parse_args(flags)) == LeaseSettings("other", "ops", "me", 4, 3, 1)


def test_leader_elect_falls_back_to_the_service_account_namespace_and_the_host(
    pod_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("from-token\n")
    pod_env.setattr("pgw_operator.__main__.SERVICE_ACCOUNT_NAMESPACE", namespace_file)
    got = leader_settings_of(parse_args(["--leader-elect"]))
    assert got is not None
    assert got.namespace == "from-token"
    assert got.identity.endswith(f"-{os.getpid()}")


def test_leader_elect_without_a_namespace_is_an_error(
    pod_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pod_env.setattr("pgw_operator.__main__.SERVICE_ACCOUNT_NAMESPACE", tmp_path / "none")
    with pytest.raises(ValueError, match="--leader-elect-namespace"):
        leader_settings_of(parse_args(["--leader-elect"]))


def test_leader_elect_timing_out_of_order_is_an_error(pod_env: pytest.MonkeyPatch) -> None:
    args = parse_args(["--leader-elect", "--leader-elect-namespace=ns",
                       "--leader-elect-renew-deadline=20"])  # fmt: skip
    with pytest.raises(ValueError, match=r"renew deadline \(20.0 s\) must be shorter"):
        leader_settings_of(args)


def test_main_refuses_bad_election_flags_as_usage_errors(
    pod_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--leader-elect", "--leader-elect-namespace=ns", "--leader-elect-retry-period=0"])
    assert info.value.code == 2
    assert "the retry period must be positive" in capsys.readouterr().err
