"""Leader election on a ``coordination.k8s.io/v1`` Lease: one replica acts, the others wait warm.

Modelled on client-go's ``leaderelection`` (what controller-runtime uses), with
the same Lease fields and meanings, so ``kubectl get lease`` reads as it does
for kube-controller-manager:

- ``holderIdentity`` names the leader; empty means released: anyone may take it.
- ``leaseDurationSeconds``: how long candidates wait, *by their own clock*,
  after they last saw the lease change, before they take it over.
- ``renewTime`` / ``acquireTime``: when the holder last renewed / took it
  (for people; expiry never compares them with the local clock, see below).
- ``leaseTransitions``: counts changes of holder.

Every write is a PUT carrying the ``resourceVersion`` that was read
(optimistic concurrency): of two candidates writing at once, the API server
accepts one and answers the other 409, which then re-reads.

Clocks: a candidate never compares ``renewTime`` (written by another
machine's clock) with its own clock. It notes, by its own monotonic clock,
when it first saw the current record, and the record expires
``leaseDurationSeconds`` after that. Clock skew between replicas then does not
matter; only their clock rates do. The price: a candidate that has just
started waits a whole lease duration before it takes over a lease that was
already stale.

Timing (``LeaseSettings``): the leader renews every ``retry_period_s``; if no
renewal succeeded for ``renew_deadline_s`` it has LOST, and exits at once
(``exit_process``) so that the kubelet restarts it as a standby. Others take
over ``lease_duration_s`` after they last saw the lease renewed, so a leader
that lost has stopped at least ``lease_duration_s - renew_deadline_s`` before
anyone else may start. On a graceful stop (SIGTERM) the leader releases the
lease (client-go's ``ReleaseOnCancel``): the standby takes over at its next
poll instead of waiting for the lease to expire.

Layout: the decision (:func:`observe`, :func:`decide`, :func:`record_to_write`,
:func:`released`) is pure; :class:`Leadership` is the state the rest of the
operator reads; :class:`KubernetesLeases` is the adapter; :func:`run_election`
the loop that ties them.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import kubernetes
import urllib3

from pgw_operator import metrics
from pgw_operator.errors import KubernetesError
from pgw_operator.kube import as_kubernetes_error

LOG = logging.getLogger("pgw_operator.leader")

T = TypeVar("T")

# The process's exit status when it lost the lease: non-zero, so the kubelet
# restarts the container (as a standby), and distinct, so the reason is visible
# in ``kubectl describe pod`` (EX_TEMPFAIL: try again).
LOST_EXIT_CODE = 75


# --- settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseSettings:
    """Which Lease to contend for, as whom, and how fast.

    Args:
        name: the Lease's name.
        namespace: the Lease's namespace.
        identity: this process's holderIdentity; unique among the candidates
            (the pod name in a cluster).
        lease_duration_s: how long others wait after the last renewal they saw.
        renew_deadline_s: how long the leader keeps trying to renew before it
            gives up leading; less than ``lease_duration_s``.
        retry_period_s: the pause between tries (renewals and acquisitions);
            less than ``renew_deadline_s``.

    Raises:
        ValueError: an empty name, namespace or identity, a duration that is not
            positive, or durations out of order (each message says which).

    Example:
        >>> LeaseSettings("op", "ns", "pod-a").lease_duration_s
        15.0
        >>> LeaseSettings("op", "ns", "pod-a", lease_duration_s=10, renew_deadline_s=10)
        Traceback (most recent call last):
        ...
        ValueError: the renew deadline (10.0 s) must be shorter than the lease duration ...
    """

    name: str
    namespace: str
    identity: str
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("namespace", self.namespace),
                            ("identity", self.identity)):  # fmt: skip
            if not value:
                raise ValueError(f"the lease {what} must not be empty")
        for what, seconds in (
            ("lease duration", self.lease_duration_s),
            ("renew deadline", self.renew_deadline_s),
            ("retry period", self.retry_period_s),
        ):
            if not seconds > 0:
                raise ValueError(f"the {what} must be positive, not {seconds}")
        # Both orders are client-go's: a leader must give up before others may
        # take over, and must get more than one try before it gives up.
        if not self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                f"the renew deadline ({float(self.renew_deadline_s)} s) must be shorter than "
                f"the lease duration ({float(self.lease_duration_s)} s): a leader that cannot "
                "renew must stop before another replica may take over"
            )
        if not self.retry_period_s < self.renew_deadline_s:
            raise ValueError(
                f"the retry period ({float(self.retry_period_s)} s) must be shorter than the "
                f"renew deadline ({float(self.renew_deadline_s)} s): the leader needs more than "
                "one try to renew before it gives up"
            )
        # Plain floats, whatever was passed (ints from the command line or tests).
        for attr in ("lease_duration_s", "renew_deadline_s", "retry_period_s"):
            object.__setattr__(self, attr, float(getattr(self, attr)))

    @property
    def lease_duration_seconds(self) -> int:
        """``spec.leaseDurationSeconds`` as written: whole seconds, rounded up (never shorter)."""
        return max(1, math.ceil(self.lease_duration_s))

    @property
    def lease_ref(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- the decision (pure) --------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRecord:
    """What election reads and writes of a Lease: its spec, and the resourceVersion read.

    ``resource_version`` does not take part in comparisons: a record is "the
    same" when its spec is, whatever else changed in the object.
    """

    holder: str = ""  # "" : released, or never held
    lease_duration_s: int = 0
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    transitions: int = 0
    resource_version: str = field(default="", compare=False)


@dataclass(frozen=True)
class Seen:
    """A Lease's record as last read, and since when (local monotonic seconds) it was the same."""

    record: LeaseRecord
    since: float


def observe(previous: Seen | None, record: LeaseRecord, now: float) -> Seen:
    """What a read tells: the record, and ``since`` kept while it did not change.

    Example:
        >>> first = observe(None, LeaseRecord("a", 15, renew_time=None), now=100.0)
        >>> observe(first, LeaseRecord("a", 15), now=105.0).since  # unchanged
        100.0
        >>> observe(first, LeaseRecord("a", 15, transitions=1), now=105.0).since
        105.0
    """
    if previous is not None and previous.record == record:
        return Seen(record, previous.since)  # the new resourceVersion, the old time
    return Seen(record, now)


@dataclass(frozen=True)
class Create:
    """There is no Lease: create it, holding it."""


@dataclass(frozen=True)
class Acquire:
    """The Lease is released or expired: take it over (one more transition)."""

    previous_holder: str  # "" when it was released


@dataclass(frozen=True)
class Renew:
    """The Lease names this identity: renew it (same acquireTime, same transitions)."""


@dataclass(frozen=True)
class Standby:
    """Another identity holds the Lease, for ``expires_in_s`` more seconds unless renewed."""

    holder: str
    expires_in_s: float


Decision = Create | Acquire | Renew | Standby


def decide(seen: Seen | None, identity: str, now: float) -> Decision:
    """What a candidate does with the Lease as read (None: there is none).

    Args:
        seen: the record read and since when (monotonic) it has been the same.
        identity: this candidate's holderIdentity.
        now: the local monotonic clock, the one ``seen.since`` was taken on.

    A lease naming this identity is renewed even when this process did not
    know it led: it is a restart of the same pod, whose old process is gone.
    The duration that counts is the one the holder wrote, not ours: a released
    lease says 1 s, so a standby takes it at once.

    Example:
        >>> held = Seen(LeaseRecord("pod-a", 15), since=100.0)
        >>> decide(held, "pod-b", now=110.0)
        Standby(holder='pod-a', expires_in_s=5.0)
        >>> decide(held, "pod-b", now=115.0)
        Acquire(previous_holder='pod-a')
        >>> decide(held, "pod-a", now=110.0)
        Renew()
        >>> decide(None, "pod-b", now=0.0)
        Create()
    """
    if seen is None:
        return Create()
    record = seen.record
    if record.holder == identity:
        return Renew()
    if not record.holder:
        return Acquire(previous_holder="")
    expires_in_s = seen.since + record.lease_duration_s - now
    if expires_in_s > 0:
        return Standby(record.holder, expires_in_s)
    return Acquire(previous_holder=record.holder)


def record_to_write(
    decision: Create | Acquire | Renew,
    current: LeaseRecord | None,
    settings: LeaseSettings,
    wall_now: datetime,
) -> LeaseRecord:
    """The record a Create, Acquire or Renew writes, with the resourceVersion it read.

    Example:
        >>> s = LeaseSettings("op", "ns", "pod-b")
        >>> t0, t1 = datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 2, tzinfo=UTC)
        >>> old = LeaseRecord("pod-a", 15, t0, t0, transitions=4, resource_version="7")
        >>> new = record_to_write(Acquire("pod-a"), old, s, t1)
        >>> (new.holder, new.transitions, new.acquire_time == t1, new.resource_version)
        ('pod-b', 5, True, '7')
    """
    base = current or LeaseRecord()
    if isinstance(decision, Renew):
        acquire_time = base.acquire_time or wall_now
        transitions = base.transitions
    else:
        acquire_time = wall_now
        transitions = base.transitions + 1 if isinstance(decision, Acquire) else 0
    return LeaseRecord(
        holder=settings.identity,
        lease_duration_s=settings.lease_duration_seconds,
        acquire_time=acquire_time,
        renew_time=wall_now,
        transitions=transitions,
        resource_version=base.resource_version,
    )


def released(current: LeaseRecord, wall_now: datetime) -> LeaseRecord:
    """The record a leader writes when it stops: no holder, a 1 s duration (client-go's
    release), so that a standby takes the lease at its next poll."""
    return replace(
        current, holder="", lease_duration_s=1, acquire_time=wall_now, renew_time=wall_now
    )


# --- the state others read ------------------------------------------------------------


class LeaderState(enum.Enum):
    """Where this process stands; LOST and RELEASED are final (the process is ending)."""

    STANDBY = "standby"  # not leading; may become the leader
    LEADING = "leading"  # holds the lease: acts
    LOST = "lost"  # led, could not renew in time: stops acting, exits
    RELEASED = "released"  # stopping: gave the lease up (or never had it)


_NEXT: dict[LeaderState, frozenset[LeaderState]] = {
    LeaderState.STANDBY: frozenset({LeaderState.LEADING, LeaderState.RELEASED}),
    LeaderState.LEADING: frozenset({LeaderState.LOST, LeaderState.RELEASED}),
    LeaderState.LOST: frozenset(),
    LeaderState.RELEASED: frozenset(),
}


class Leadership:
    """Whether this process may act: what handlers check before they write.

    Without election (:meth:`always`) it is LEADING from the start. With it,
    it starts STANDBY and :func:`run_election` moves it. Sets the
    ``pgw_operator_leader`` gauge on every change.

    Example:
        >>> import asyncio
        >>> leadership = Leadership("pod-a")
        >>> leadership.is_leading, leadership.state.value
        (False, 'standby')
        >>> leadership.become(LeaderState.LEADING)
        >>> asyncio.run(leadership.wait_leading())  # returns at once when leading
        >>> Leadership.always().is_leading
        True
    """

    def __init__(self, identity: str, state: LeaderState = LeaderState.STANDBY) -> None:
        self.identity = identity
        self._state = state
        # Created here, bound to the loop of its first waiter (Python >= 3.10).
        self._leading = asyncio.Event()
        self._publish()

    @classmethod
    def always(cls) -> Leadership:
        """A run without election: the only replica, always leading."""
        return cls("", LeaderState.LEADING)

    @property
    def state(self) -> LeaderState:
        return self._state

    @property
    def is_leading(self) -> bool:
        return self._state is LeaderState.LEADING

    async def wait_leading(self) -> None:
        """Return once this process leads (at once if it does). A process that
        lost or released never leads again: then this waits until cancelled."""
        if self.is_leading:
            return
        await self._leading.wait()

    def become(self, state: LeaderState) -> None:
        """Move to ``state`` (no-op if already there).

        Raises:
            RuntimeError: a move the state machine forbids (e.g. LOST -> LEADING): a bug.
        """
        if state is self._state:
            return
        if state not in _NEXT[self._state]:
            raise RuntimeError(f"leadership cannot go from {self._state.value} to {state.value}")
        self._state = state
        self._publish()

    def _publish(self) -> None:
        if self.is_leading:
            self._leading.set()
        else:
            self._leading.clear()
        metrics.LEADER.set(1 if self.is_leading else 0)


# --- the adapter ----------------------------------------------------------------------


class LeaseApi(Protocol):
    """Blocking Lease calls (run in a thread). Failures are :class:`KubernetesError`;
    a write that lost a race has ``status`` 409."""

    def read(self, namespace: str, name: str) -> LeaseRecord | None: ...

    def create(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord: ...

    def replace(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord: ...


def _micro_time(value: datetime | None) -> str | None:
    """A MicroTime as the API server parses it: RFC 3339 with exactly six fraction digits
    (``datetime.isoformat`` drops them when the microseconds are 0)."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None  # for people only; a malformed one never decides anything


def record_of(lease: dict[str, Any]) -> LeaseRecord:
    """A Lease object (JSON) -> its record; missing fields read as empty."""
    spec = lease.get("spec") or {}
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        lease_duration_s=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=_parse_time(spec.get("acquireTime")),
        renew_time=_parse_time(spec.get("renewTime")),
        transitions=int(spec.get("leaseTransitions") or 0),
        resource_version=str((lease.get("metadata") or {}).get("resourceVersion") or ""),
    )


def lease_body(namespace: str, name: str, record: LeaseRecord) -> dict[str, Any]:
    """The Lease object a record writes (with its resourceVersion, when it has one)."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if record.resource_version:
        metadata["resourceVersion"] = record.resource_version
    spec = {
        "holderIdentity": record.holder or None,  # released: no holder (as client-go)
        "leaseDurationSeconds": record.lease_duration_s,
        "acquireTime": _micro_time(record.acquire_time),
        "renewTime": _micro_time(record.renew_time),
        "leaseTransitions": record.transitions,
    }
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {key: value for key, value in spec.items() if value is not None},
    }


@dataclass(frozen=True)
class KubernetesLeases:
    """:class:`LeaseApi` through the kubernetes client (configured by kopf's login or
    :func:`pgw_operator.kube.load_config`). Objects travel as plain JSON: the
    client's models would write a MicroTime the API server may refuse."""

    request_timeout_s: float = 10.0

    def _call(self, what: str, call: Callable[[], Any]) -> dict[str, Any]:
        try:
            response = call()
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as exc:
            error = as_kubernetes_error(exc, what)
            assert error is not None
            raise error from exc
        body: dict[str, Any] = json.loads(response.data)
        return body

    def _api(self) -> Any:
        return kubernetes.client.CoordinationV1Api()

    def read(self, namespace: str, name: str) -> LeaseRecord | None:
        try:
            lease = self._call(
                f"read Lease {namespace}/{name}",
                lambda: self._api().read_namespaced_lease(
                    name, namespace, _preload_content=False,
                    _request_timeout=self.request_timeout_s,
                ),
            )  # fmt: skip
        except KubernetesError as exc:
            if exc.status == 404:
                return None
            raise
        return record_of(lease)

    def create(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        lease = self._call(
            f"create Lease {namespace}/{name}",
            lambda: self._api().create_namespaced_lease(
                namespace, lease_body(namespace, name, replace(record, resource_version="")),
                _preload_content=False, _request_timeout=self.request_timeout_s,
            ),
        )  # fmt: skip
        return record_of(lease)

    def replace(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        lease = self._call(
            f"update Lease {namespace}/{name}",
            lambda: self._api().replace_namespaced_lease(
                name, namespace, lease_body(namespace, name, record),
                _preload_content=False, _request_timeout=self.request_timeout_s,
            ),
        )  # fmt: skip
        return record_of(lease)


# --- the loop -------------------------------------------------------------------------


class Clock(Protocol):
    """The clocks the loop uses, injectable so tests run it in virtual time."""

    def monotonic(self) -> float: ...

    def wall(self) -> datetime: ...

    def sleep(self, seconds: float) -> Awaitable[None]: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> datetime:
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> Awaitable[None]:
        return asyncio.sleep(seconds)


def exit_process(reason: str) -> None:
    """What a leader that lost does by default: log why and leave at once.

    ``os._exit`` skips cleanup on purpose: a graceful stop would keep the
    pool loops writing (draining, finalizers) while another replica may
    already lead. The kubelet restarts the container, which comes back as a
    standby (or, if no one took the lease meanwhile, leads again).
    """
    LOG.error("exiting (status %d) to stop acting at once: %s", LOST_EXIT_CODE, reason)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(LOST_EXIT_CODE)


def _how(decision: Decision) -> str:
    """How a write made this process the leader, for its log."""
    if isinstance(decision, Acquire):
        if decision.previous_holder:
            return f"took it over from {decision.previous_holder}, whose lease expired"
        return "took it: it was released"
    return "created it" if isinstance(decision, Create) else "it named this identity already"


class _Deadline(Exception):
    """The leader's renew deadline passed while a call was in flight."""


@dataclass
class _Elector:
    settings: LeaseSettings
    leadership: Leadership
    api: LeaseApi
    on_lost: Callable[[str], None]
    clock: Clock
    # Threads of its own: in the loop's default executor a renewal would queue
    # behind the pool passes' slow calls (a Prefect timeout) and miss its deadline.
    executor: Executor
    seen: Seen | None = None
    renewed_at: float = 0.0  # monotonic, before the last successful write as leader
    last_error: str = ""
    announced: str | None = None  # the holder last logged, so a standby logs changes only

    def in_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.executor, functools.partial(fn, *args))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread; while leading, bounded by the renew deadline."""
        if not self.leadership.is_leading:
            return await self.in_thread(fn, *args)
        left = self.renewed_at + self.settings.renew_deadline_s - self.clock.monotonic()
        try:
            return await asyncio.wait_for(self.in_thread(fn, *args), timeout=max(left, 0.0))
        except TimeoutError as exc:
            raise _Deadline from exc

    async def attempt(self) -> bool:
        """One round: read (unless renewing what it wrote), decide, write.

        Returns:
            True to go again at once (a write lost a race: re-read), else False.
        """
        s = self.settings
        now = self.clock.monotonic()
        mine = self.seen.record if self.seen else None
        if self.leadership.is_leading and mine is not None:
            # client-go's fast path: the leader renews what it last wrote; a 409
            # (someone else wrote since) sends it back to read.
            decision: Decision = Renew()
            current: LeaseRecord | None = mine
        else:
            read = await self.call(self.api.read, s.namespace, s.name)
            now = self.clock.monotonic()
            self.seen = None if read is None else observe(self.seen, read, now)
            decision = decide(self.seen, s.identity, now)
            current = read
        if self.leadership.is_leading and isinstance(decision, Standby | Acquire):
            # The lease no longer names this process (taken over, or released by
            # someone else): it is not the leader, whatever its deadline says.
            # Stop now rather than act beside the new one.
            holder = decision.holder if isinstance(decision, Standby) else "nobody"
            self.lose(f"the lease is now held by {holder}")
            return False
        if isinstance(decision, Standby):
            if self.announced != decision.holder:
                LOG.info(
                    "standby: lease %s is held by %s (taken over if not renewed within %.0f s)",
                    s.lease_ref, decision.holder, decision.expires_in_s,
                )  # fmt: skip
                self.announced = decision.holder
            return False
        record = record_to_write(decision, current, s, self.clock.wall())
        try:
            if isinstance(decision, Create):
                written = await self.call(self.api.create, s.namespace, s.name, record)
            else:
                written = await self.call(self.api.replace, s.namespace, s.name, record)
        except KubernetesError as exc:
            # 409: someone else wrote since it was read; 404: deleted since. Either
            # way what was read is stale: read again (a leader too, off its fast path).
            if exc.status in (404, 409):
                LOG.debug("lease %s changed under us (%s): reading it again", s.lease_ref, exc)
                self.seen = None if self.leadership.is_leading else self.seen
                return True
            raise
        self.seen = Seen(written, now)
        self.renewed_at = now
        self.last_error = ""
        if not self.leadership.is_leading:
            self.leadership.become(LeaderState.LEADING)
            self.announced = s.identity
            LOG.info(
                "leading: lease %s is held by %s (%s; transitions: %d)",
                s.lease_ref, s.identity, _how(decision), written.transitions,
            )  # fmt: skip
        return False

    def lose(self, why: str) -> None:
        self.leadership.become(LeaderState.LOST)
        reason = f"lost the leadership of lease {self.settings.lease_ref}: {why}"
        LOG.error("%s; this replica stops acting now", reason)
        self.on_lost(reason)

    def finished(self) -> bool:
        """LOST or RELEASED: this process contends no more."""
        return self.leadership.state in (LeaderState.LOST, LeaderState.RELEASED)

    def overdue(self) -> bool:
        deadline = self.renewed_at + self.settings.renew_deadline_s
        return self.leadership.is_leading and self.clock.monotonic() >= deadline

    def lost_reason(self) -> str:
        why = f"could not renew it within the renew deadline ({self.settings.renew_deadline_s:g} s)"
        return why + (f"; last error: {self.last_error}" if self.last_error else "")

    async def run(self) -> None:
        s = self.settings
        LOG.info(
            "leader election on lease %s as %s (lease %g s, renew deadline %g s, retry %g s)",
            s.lease_ref, s.identity, s.lease_duration_s, s.renew_deadline_s, s.retry_period_s,
        )  # fmt: skip
        retried = False  # a lost race is re-read at once, but only once in a row
        while not self.finished():
            again = False
            try:
                again = await self.attempt() and not retried
            except _Deadline:
                pass  # overdue() below says so
            except KubernetesError as exc:
                # Once per kind of failure, not every retry period.
                level = logging.DEBUG if str(exc) == self.last_error else logging.WARNING
                self.last_error = str(exc)
                LOG.log(level, "lease %s: %s", s.lease_ref, exc)
            except Exception as exc:  # a bug or a surprise: a failed try, not a crash
                self.last_error = repr(exc)
                LOG.exception("lease %s: unexpected failure", s.lease_ref)
            if self.finished():
                return
            if self.overdue():
                self.lose(self.lost_reason())
                return
            retried = again
            if not again:
                await self.clock.sleep(self.pause())

    def pause(self) -> float:
        """The next try: a retry period, but never past the renew deadline."""
        if not self.leadership.is_leading:
            return self.settings.retry_period_s
        left = self.renewed_at + self.settings.renew_deadline_s - self.clock.monotonic()
        return max(0.0, min(self.settings.retry_period_s, left))

    async def release(self) -> None:
        """Give the lease up if this process holds it, so a standby leads at once."""
        was_leading = self.leadership.is_leading
        if self.leadership.state in (LeaderState.STANDBY, LeaderState.LEADING):
            self.leadership.become(LeaderState.RELEASED)  # stop acting before anything else
        if (
            not was_leading
            or self.seen is None
            or self.seen.record.holder != self.settings.identity
        ):
            return
        s = self.settings
        record = released(self.seen.record, self.clock.wall())
        try:
            # Bounded: a stop must not hang on an unreachable API server.
            await asyncio.wait_for(
                self.in_thread(self.api.replace, s.namespace, s.name, record),
                timeout=s.renew_deadline_s,
            )
        except (KubernetesError, TimeoutError) as exc:
            LOG.warning(
                "could not release lease %s (%s): a standby takes over once it expires",
                s.lease_ref, exc,
            )  # fmt: skip
        else:
            LOG.info("released lease %s", s.lease_ref)


async def run_election(
    settings: LeaseSettings,
    leadership: Leadership,
    *,
    api: LeaseApi | None = None,
    on_lost: Callable[[str], None] = exit_process,
    clock: Clock | None = None,
    executor: Executor | None = None,
) -> None:
    """Contend for the Lease until cancelled, moving ``leadership`` as it goes.

    Creates the Lease when there is none, takes it once it is released or
    expired, renews it every retry period while leading. A leader that cannot
    renew within the renew deadline, or that finds another holder, becomes
    LOST and calls ``on_lost`` with the reason (by default
    :func:`exit_process`: the process ends); the loop then returns. Cancelled
    (the operator stops), it releases the lease if it holds it, then re-raises.

    Args:
        settings: the lease, identity and timing.
        leadership: the state to move (made with ``Leadership(settings.identity)``).
        api: the Lease calls; default :class:`KubernetesLeases`.
        on_lost: called once, with why, when leadership is lost.
        clock: monotonic and wall clocks and sleep; default the system's.
        executor: where the blocking calls run; default two threads of its own.

    Example:
        >>> settings = LeaseSettings("pgw-operator", "pgw-system", "pod-a")
        >>> leadership = Leadership(settings.identity)
        >>> task = asyncio.create_task(run_election(settings, leadership))  # doctest: +SKIP
    """
    # Two threads: a call abandoned at the deadline may hold one until its timeout.
    threads = executor or ThreadPoolExecutor(2, thread_name_prefix="leader-election")
    elector = _Elector(
        settings,
        leadership,
        api or KubernetesLeases(request_timeout_s=settings.renew_deadline_s),
        on_lost,
        clock or SystemClock(),
        threads,
    )
    try:
        await elector.run()
    except asyncio.CancelledError:
        await elector.release()
        raise
    finally:
        if executor is None:
            threads.shutdown(wait=False)
