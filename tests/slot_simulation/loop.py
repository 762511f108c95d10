"""An asyncio event loop on virtual time: deterministic, and as fast as the CPU allows.

The loop is asyncio's own selector loop with a selector that never waits: when
nothing is ready, ``select(timeout)`` moves the clock to the next timer instead
of sleeping. Everything asyncio times (``sleep``, ``wait_for``, ``timeout``,
``call_later``) runs on this clock, so five simulated minutes of leases and
retries take milliseconds, and a run is a pure function of its inputs: the same
seed replays the same interleaving.

Only in-memory I/O works on this loop (no sockets, no subprocesses, no threads):
the simulation connects steps to the broker through :mod:`.pipes` and the broker
to Prefect through an httpx transport.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class SimulationStalled(RuntimeError):
    """Nothing is ready and no timer is set: every task waits for something that
    never comes (a lost wake-up, a deadlock)."""


class _VirtualSelector(selectors.BaseSelector):
    """Registers what asyncio asks (its self-pipe) but never reports readiness."""

    def __init__(self) -> None:
        self._keys: dict[int, selectors.SelectorKey] = {}
        self.loop: VirtualTimeLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        assert self.loop is not None
        if timeout is None:
            raise SimulationStalled("no task is ready and no timer is set")
        if timeout > 0:
            self.loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector loop whose ``time()`` only moves when every task waits on a timer."""

    def __init__(self, start: float = 1000.0) -> None:
        selector = _VirtualSelector()
        self._now = start
        super().__init__(selector)
        selector.loop = self
        # Tasks that end with an unretrieved exception would be reported at
        # garbage collection, at a moment that depends on the allocator.
        self.set_exception_handler(self._record_exception)
        self.unhandled: list[dict[str, Any]] = []

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def _record_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.unhandled.append(context)


def run(main: Coroutine[Any, Any, T], *, start: float = 1000.0) -> T:
    """Run coroutine ``main`` to completion on a fresh :class:`VirtualTimeLoop`."""
    loop = VirtualTimeLoop(start)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            loop.close()
