"""Per-pool wake-up events and locks, in one place, forgotten together.

The pool's daemon waits on its wake-up event; event handlers set it. The lock
makes the daemon and the deletion handler the pool's only, and exclusive,
writers. :meth:`PoolRegistry.forget` drops both once a pool is gone.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

PoolKey = tuple[str, str]  # (namespace, pool name)


@dataclass
class PoolRegistry:
    """Wake-ups and locks of the pools this process serves.

    Example:
        >>> registry = PoolRegistry()
        >>> event = registry.wakeup(("ns", "pool"))
        >>> registry.wake("ns", "pool"); event.is_set()
        True
        >>> registry.forget(("ns", "pool")); registry.pools()
        set()
    """

    _wakeups: dict[PoolKey, asyncio.Event] = field(default_factory=dict)
    _locks: dict[PoolKey, asyncio.Lock] = field(default_factory=dict)

    def wakeup(self, key: PoolKey) -> asyncio.Event:
        """The pool's wake-up event (created on first use)."""
        return self._wakeups.setdefault(key, asyncio.Event())

    def lock(self, key: PoolKey) -> asyncio.Lock:
        """The pool's writer lock (created on first use)."""
        return self._locks.setdefault(key, asyncio.Lock())

    def wake(self, namespace: str | None, pool: str | None) -> None:
        """Wake the pool's daemon, if it runs; events of unknown pools are dropped."""
        if namespace and pool and (event := self._wakeups.get((namespace, pool))):
            event.set()

    def forget(self, key: PoolKey) -> None:
        """Drop everything held for a pool that is gone."""
        self._wakeups.pop(key, None)
        self._locks.pop(key, None)

    def pools(self) -> set[PoolKey]:
        """Pools with anything held (for tests and debugging)."""
        return set(self._wakeups) | set(self._locks)
