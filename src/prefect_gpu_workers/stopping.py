"""How a stop waits for processes to go: up to a grace period, unless hurried.

Local mode stops its processes in steps (workers and flow runs, then the
server, then its database), each with a grace period before SIGKILL. A person
who presses Ctrl-C a second time wants no more waiting: every step shares one
``hurry`` event, and once it is set each remaining wait ends at once and the
step goes straight to SIGKILL. Stdlib only.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

# How often a wait looks again, for cheap checks (a child's exit status, one
# pid); a scan of every process in /proc passes a longer poll_s.
POLL_S = 0.05


def wait_until(
    done: Callable[[], bool],
    up_to_s: float,
    hurry: threading.Event | None = None,
    poll_s: float = POLL_S,
) -> bool:
    """Wait until ``done()`` is true, for at most ``up_to_s``, or until ``hurry`` is set.

    Args:
        done: the condition, e.g. "no process of the server is left".
        up_to_s: the grace period.
        hurry: when set (by a second Ctrl-C, say) the wait ends at once.
        poll_s: how often ``done`` is asked.

    Returns:
        Whether ``done()`` became true (False: the grace ran out, or hurried).

    Example:
        >>> wait_until(lambda: True, 10.0)
        True
        >>> hurried = threading.Event()
        >>> hurried.set()
        >>> wait_until(lambda: False, 3600.0, hurried)
        False
    """
    deadline = time.monotonic() + up_to_s
    while not done():
        if hurry is not None and hurry.is_set():
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if hurry is not None:
            hurry.wait(min(poll_s, left))
        else:
            time.sleep(min(poll_s, left))
    return True


class StopSignals:
    """SIGINT/SIGTERM for a command that stops what it started: once, then hurry.

    The first signal raises :class:`KeyboardInterrupt`, which unwinds into the
    cleanup; any later one only sets :attr:`hurry`, so the cleanup cannot be
    cut short by an exception and leave processes behind: it skips its
    remaining grace periods instead.

    Example:
        >>> signals = StopSignals()
        >>> try:
        ...     signals(2, None)
        ... except KeyboardInterrupt:
        ...     print("stopping")
        stopping
        >>> signals(2, None); signals.hurry.is_set()
        True
    """

    def __init__(self) -> None:
        self.received = 0
        self.hurry = threading.Event()

    def __call__(self, signum: int, frame: object) -> None:
        self.received += 1
        if self.received == 1:
            raise KeyboardInterrupt
        self.hurry.set()


def installed_hurry() -> threading.Event:
    """The ``hurry`` event of the :class:`StopSignals` handling SIGINT, else a new event.

    So a stop started anywhere below a command that installed them is hurried
    by that command's second Ctrl-C.
    """
    handler = signal.getsignal(signal.SIGINT)
    return handler.hurry if isinstance(handler, StopSignals) else threading.Event()
