"""The slot broker under Prefect faults: slots given back exactly once, leases kept alive.

Most tests put a :class:`FaultProxy` between the broker and a real Prefect
server: the request reaches the server, which applies it, and the broker gets
a fault back instead of the answer (a 500 after commit, as Prefect's server
produces when it fails after decrementing). A plain ``concurrency()`` holder,
outside the broker, holds a slot throughout: a second give-back would uncount
it (Prefect's count under the slots really held, invariant I2 of issue 21).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from broker_harness import (
    BrokerThread,
    active_slots,
    create_limit,
    start_thread,
    unique_worker,
    wait_until,
)
from prefect.concurrency.sync import concurrency
from recording_server import FaultProxy, origin

from prefect_gpu_workers.server import LocalPrefectServer
from prefect_gpu_workers.slots.wire import decode, encode


class SocketStep:
    """A GPU step speaking the broker's wire protocol itself: acquire, then release."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.lines = self.sock.makefile("rb")

    def send(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one message; the broker's answer."""
        self.sock.sendall(encode(message))
        return decode(self.lines.readline())

    def acquire(self, limit: str, occupy: int = 1) -> dict[str, Any]:
        return self.send({"op": "acquire", "limit": limit, "occupy": occupy})

    def release(self) -> dict[str, Any]:
        self.sock.sendall(encode({"op": "release"}))
        answer = decode(self.lines.readline())
        self.sock.close()
        return answer


@contextmanager
def plain_holder(name: str) -> Iterator[None]:
    """Someone else's flow holds one slot of ``name`` through Prefect's own concurrency()."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with concurrency(name, occupy=1, strict=True):
            holding.set()
            done.wait(300)

    thread = start_thread(hold)
    wait_until(holding.is_set, "the plain holder holds its slot")
    try:
        yield
    finally:
        done.set()
        thread.join(60)


def test_a_release_answered_500_after_it_landed_is_not_counted_back_twice(
    prefect_server: LocalPrefectServer,
) -> None:
    """Defect 1: the retry probed, met 410 (the lease was gone), read it as lost
    by a restart and decremented by hand: one slot uncounted while held."""
    worker = unique_worker()
    name = f"gpu:{worker}"
    create_limit(name, 2)
    proxy = FaultProxy(upstream=origin(prefect_server.api_url))
    with proxy.running(), plain_holder(name):
        with BrokerThread(worker, api_url=f"{proxy.url}/api") as broker:
            step = SocketStep(broker.socket_path)
            assert step.acquire(name)["event"] == "granted"
            assert active_slots(name) == 2
            proxy.fail_after_upstream("/v2/concurrency_limits/decrement-with-lease", 500)
            assert step.release()["event"] == "released"
            wait_until(
                lambda: broker.describe()["give_backs_in_flight"] == 0,
                "the broker's give-back is done",
            )
            assert proxy.faulted == 1, "the release never met its fault"
            assert broker.describe()["lost_leases_repaired"] == 0
        # The plain holder's slot is still counted: nothing was given back twice.
        assert active_slots(name) == 1
    assert active_slots(name) == 0


def test_a_malformed_acquire_gets_one_line_and_no_traceback(
    prefect_server: LocalPrefectServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect 9, in part: ``occupy: null`` surfaced as a TypeError traceback."""
    worker = unique_worker()
    name = f"gpu:{worker}"
    create_limit(name, 1)
    with BrokerThread(worker) as broker:
        for occupy in (None, 1.5, True):
            step = SocketStep(broker.socket_path)
            answer = step.send({"op": "acquire", "limit": name, "occupy": occupy})
            assert answer["event"] == "error"
            assert answer["kind"] == "bad_request"
            assert answer["message"].startswith("occupy must be a whole number of slots >= 1")
        assert broker.stats(name)["held"] == 0
    assert "Traceback" not in caplog.text
    assert "request failed" not in caplog.text


def test_renewals_go_on_while_every_limit_read_fails(prefect_server: LocalPrefectServer) -> None:
    """Defect 3, in part: the limit refresh and the renewals shared one ``try``, so
    a limit read that kept failing stopped every renewal and the leases expired
    under running steps."""
    worker = unique_worker()
    name = f"gpu:{worker}"
    create_limit(name, 1)
    proxy = FaultProxy(upstream=origin(prefect_server.api_url))
    skew = [0.0]
    with (
        proxy.running(),
        BrokerThread(
            worker,
            api_url=f"{proxy.url}/api",
            maintenance_s=0.2,
            limit_refresh_s=0.2,
            clock=lambda: time.monotonic() + skew[0],
        ) as broker,
    ):
        step = SocketStep(broker.socket_path)
        assert step.acquire(name)["event"] == "granted"
        proxy.fail(500, path_fragment=f"/v2/concurrency_limits/{name}")
        wait_until(lambda: proxy.faulted >= 2, "the broker's limit reads fail")
        renewals_before = renewals(proxy)
        assert broker.broker is not None
        skew[0] = broker.broker.lease_duration / 2  # a renewal is due
        wait_until(lambda: renewals(proxy) > renewals_before, "a renewal despite the failing reads")
        proxy.heal()
        assert step.release()["event"] == "released"
        wait_until(lambda: broker.describe()["give_backs_in_flight"] == 0, "the give-back")
    assert active_slots(name) == 0


def renewals(proxy: FaultProxy) -> int:
    return sum(1 for hit in list(proxy.hits) if hit.target.endswith("/renew"))
