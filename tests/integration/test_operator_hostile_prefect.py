"""The operator's Prefect adapter against a hostile endpoint (issue 22).

A pool's owner picks its ``apiUrl``; whatever answers there must not take the
operator down for every other tenant. A loopback server answers as an attacker
would: 600 MB bodies (with and without a Content-Length), a listing whose pages
never end, a byte every 5 s. Each call must end within its deadline with a
named error, and the operator's memory must stay far below its 512Mi limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pgw_operator.api_url import parse_api_url
from pgw_operator.errors import PrefectError
from pgw_operator.prefect_api import BY_NAME_AT_MOST, MAX_BODY_BYTES, MAX_PAGES, PrefectApi

HUGE = 600 * 1024 * 1024
CHUNK = b"[" + b"0," * 32767 + b"0"  # 64 kB of a JSON list that never closes


@contextmanager
def hostile(mode: str) -> Iterator[tuple[str, list[str]]]:
    """A server at the URL it yields that answers every request as ``mode`` says;
    the list records each request's path."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            seen.append(self.path)
            # The operator hanging up part way is what it should do.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._answer()

        do_GET = do_PATCH = do_DELETE = do_POST

        def _answer(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if mode == "pages":  # a full page of other pools' limits, every time
                page = [{"name": f"gpu:other-{i}", "limit": 1, "active": True,
                         "active_slots": 0} for i in range(200)]  # fmt: skip
                payload = json.dumps(page).encode()
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            if mode == "huge":
                self.send_header("Content-Length", str(HUGE))
            elif mode == "drip":
                self.send_header("Content-Length", "1000")
            self.end_headers()  # "huge-unsized": no length, the body runs to the close
            for _ in range(HUGE // len(CHUNK)):
                if mode == "drip":
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(5.0)
                else:
                    self.wfile.write(CHUNK)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}/api", seen
    finally:
        server.shutdown()
        server.server_close()


def measured(call: Callable[[], Awaitable[Any]]) -> tuple[PrefectError, float, int]:
    """Run ``call`` (which must fail); its error, the seconds it took and the peak
    of memory Python allocated meanwhile."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(PrefectError) as info:
            asyncio.run(call())  # type: ignore[arg-type]
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return info.value, took, peak


async def _read_limits(url: str, names: set[str] | None = None) -> None:
    api = PrefectApi(parse_api_url(url))
    try:
        await api.read_limits(names or {"gpu:mine"})
    finally:
        await api.aclose()


# More limits than are read one GET each: read a page of 200 at a time.
PAGED = {f"gpu:mine-{i}" for i in range(BY_NAME_AT_MOST + 1)}


@pytest.mark.parametrize("mode", ["huge", "huge-unsized"])
def test_a_600_mb_answer_is_not_read(
    mode: str, record_property: Callable[[str, object], None]
) -> None:
    with hostile(mode) as (url, seen):
        error, took, peak = measured(lambda: _read_limits(url))
    assert error.reason == "PrefectBadResponse"
    assert f"larger than {MAX_BODY_BYTES} bytes" in str(error)
    assert len(seen) == 1
    # Read up to the cap at most, never the whole 600 MB (the operator's limit is 512Mi).
    assert peak < 4 * MAX_BODY_BYTES, peak
    record_property("seconds", round(took, 2))
    record_property("peak_bytes", peak)


def test_pages_that_never_end_stop_at_the_page_cap(
    record_property: Callable[[str, object], None],
) -> None:
    with hostile("pages") as (url, seen):
        error, took, peak = measured(lambda: _read_limits(url, PAGED))
    assert error.reason == "PrefectBadResponse"
    assert f"more than {MAX_PAGES} pages" in str(error)
    assert len(seen) == MAX_PAGES
    assert peak < 4 * MAX_BODY_BYTES, peak  # pages are not kept, only the limits found
    record_property("seconds", round(took, 2))
    record_property("peak_bytes", peak)


def test_a_byte_every_5_s_ends_at_the_call_deadline(
    record_property: Callable[[str, object], None],
) -> None:
    """httpx's timeout is per read: a byte every 5 s never trips its 10 s. The
    call's own deadline does (3 s here; 30 s by default)."""
    with hostile("drip") as (url, _):
        api = PrefectApi(parse_api_url(url), deadline_s=3.0)

        async def count() -> None:
            try:
                await api.ensure_work_pool("gpu")
            finally:
                await api.aclose()

        error, took, _ = measured(count)
    assert error.reason == "PrefectUnreachable"
    assert "no whole answer within 3 s" in str(error)
    assert took < 15.0, took  # bounded (a drip of 1000 bytes would take 5000 s), not fast
    record_property("seconds", round(took, 2))
