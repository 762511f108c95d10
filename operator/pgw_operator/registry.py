"""Per-pool wake-ups, pending work and locks, in one place, forgotten together.

The pool's daemon waits on its wake-up event; event handlers set it and say
what changed: a pod (or its GpuWorkerLimit) by name, or the pool's Deployment.
The daemon takes that work and reconciles only it, so a pod's event costs a
pass over that pod, not over the pool. The gate lets passes over disjoint pods
run side by side while a pass over the whole pool, or its deletion, runs alone.
:meth:`PoolRegistry.forget` drops everything once a pool is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

PoolKey = tuple[str, str]  # (namespace, pool name)


@dataclass
class PendingWork:
    """What changed since the daemon last looked."""

    pods: set[str] = field(default_factory=set)
    deployment: bool = False  # the pool's Deployment changed (status, drift)


class PassGate:
    """Pod passes share the pool; a whole-pool pass or the pool's deletion has it alone
    (waiting for the pod passes in flight; none starts meanwhile).

    Example:
        >>> async def demo() -> list[str]:
        ...     gate, seen = PassGate(), []
        ...     async with gate.shared():
        ...         seen.append(f"pods in flight: {gate.in_flight}")
        ...     async with gate.exclusive():
        ...         seen.append(f"alone: {gate.in_flight}")
        ...     return seen
        >>> asyncio.run(demo())
        ['pods in flight: 1', 'alone: 0']
    """

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self.in_flight = 0
        self._alone = False

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._alone)
            self.in_flight += 1
        try:
            yield
        finally:
            async with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._alone)
            self._alone = True
            await self._changed.wait_for(lambda: self.in_flight == 0)
        try:
            yield
        finally:
            async with self._changed:
                self._alone = False
                self._changed.notify_all()


@dataclass
class PoolRegistry:
    """Wake-ups, pending work and locks of the pools this process serves.

    Example:
        >>> registry = PoolRegistry()
        >>> event = registry.wakeup(("ns", "pool"))
        >>> registry.pod_changed("ns", "pool", "w-0"); event.is_set()
        True
        >>> registry.take(("ns", "pool")).pods
        {'w-0'}
        >>> registry.forget(("ns", "pool")); registry.pools()
        set()
    """

    _wakeups: dict[PoolKey, asyncio.Event] = field(default_factory=dict)
    _pending: dict[PoolKey, PendingWork] = field(default_factory=dict)
    _gates: dict[PoolKey, PassGate] = field(default_factory=dict)
    _deployments: dict[PoolKey, Hashable] = field(default_factory=dict)  # last seen, per pool

    def wakeup(self, key: PoolKey) -> asyncio.Event:
        """The pool's wake-up event (created on first use: the daemon serves the pool)."""
        self._pending.setdefault(key, PendingWork())
        return self._wakeups.setdefault(key, asyncio.Event())

    def gate(self, key: PoolKey) -> PassGate:
        """The pool's pass gate (created on first use)."""
        return self._gates.setdefault(key, PassGate())

    def wake(self, namespace: str | None, pool: str | None) -> None:
        """Wake the pool's daemon, if it runs; events of unknown pools are dropped."""
        if namespace and pool and (event := self._wakeups.get((namespace, pool))):
            event.set()

    def pod_changed(self, namespace: str | None, pool: str | None, pod: str) -> None:
        """A pod of the pool (or its GpuWorkerLimit) changed: reconcile its limits."""
        self.pods_changed(namespace, pool, (pod,))

    def pods_changed(self, namespace: str | None, pool: str | None, pods: Iterable[str]) -> None:
        if namespace and pool and (pending := self._pending.get((namespace, pool))):
            pending.pods.update(pods)
            self.wake(namespace, pool)

    def deployment_changed(
        self, namespace: str | None, pool: str | None, seen: Hashable = None
    ) -> None:
        """The pool's Deployment changed in what ``seen`` sums up (the same again is
        no work: its status changes with every pod of a scale)."""
        key = (namespace or "", pool or "")
        if namespace and pool and (pending := self._pending.get(key)):
            if seen is not None and self._deployments.get(key) == seen:
                return
            self._deployments[key] = seen
            pending.deployment = True
            self.wake(namespace, pool)

    def requeue(self, key: PoolKey, work: PendingWork) -> None:
        """Put back work a failed pass did not finish, without waking the daemon (it
        comes back to it after its backoff, or with the next change)."""
        if (pending := self._pending.get(key)) is not None:
            pending.pods.update(work.pods)
            pending.deployment = pending.deployment or work.deployment

    def take(self, key: PoolKey) -> PendingWork:
        """The work pending for the pool, which is then none."""
        pending = self._pending.get(key)
        if pending is None:
            return PendingWork()
        self._pending[key] = PendingWork()
        return pending

    def forget(self, key: PoolKey) -> None:
        """Drop everything held for a pool that is gone."""
        self._wakeups.pop(key, None)
        self._pending.pop(key, None)
        self._gates.pop(key, None)
        self._deployments.pop(key, None)

    def pools(self) -> set[PoolKey]:
        """Pools with anything held (for tests and debugging)."""
        return set(self._wakeups) | set(self._gates)
