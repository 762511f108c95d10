"""Loopback HTTP servers for tests: one that records every request and answers
with a fixed response, and a proxy that passes requests to a real server until
told to fail.

``RecordingServer`` stands in for a service the operator must not read back (or
must not reach at all) in the security tests. ``FaultProxy`` sits between the
operator and a real Prefect server and turns it into one that answers 5xx (or
any status) on demand: the faults are injected on the wire, nothing in the
operator's code is mocked.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

import httpx


@dataclass(frozen=True)
class Hit:
    method: str
    target: str  # the request target exactly as sent: path and any query
    headers: dict[str, str]


@dataclass
class RecordingServer:
    """Answers every request with ``status``, ``body`` and ``headers``; records it first."""

    status: int = 404
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def answer(self, hit: Hit, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """The status, headers and payload sent back for one request."""
        return self.status, {"Content-Type": "application/json", **self.headers}, self.body.encode()

    def tunnel(self, handler: BaseHTTPRequestHandler) -> bool:
        """Take over the connection (a websocket); whether it did. Here: never."""
        return False

    @contextmanager
    def running(self) -> Iterator[Self]:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                if recorder.tunnel(self):
                    self.close_connection = True
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                hit = Hit(self.command, self.path, headers)
                recorder.hits.append(hit)
                status, answer_headers, payload = recorder.answer(hit, body)
                self.send_response(status)
                for name, value in answer_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass  # the hits are the record

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()


INJECTED = b'{"detail": "injected fault"}'


def origin(api_url: str) -> str:
    """``scheme://host:port`` of a URL: where a proxy sends what it passes on."""
    parts = urlsplit(api_url)
    return f"{parts.scheme}://{parts.netloc}"


# Headers a proxy must not pass on (RFC 9110, 7.6.1), and the length it sets itself.
HOP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "host",
})  # fmt: skip


@dataclass
class FaultProxy(RecordingServer):
    """Passes every request to ``upstream`` (a real server) and its answer back,
    except while :meth:`fail` is in force: then it answers ``status`` itself.

    Example:
        >>> proxy = FaultProxy(upstream="http://127.0.0.1:4200")
        >>> with proxy.running():  # doctest: +SKIP
        ...     proxy.fail(503)  # the operator now meets a Prefect that answers 503
        ...     proxy.heal()
    """

    upstream: str = ""
    failing: bool = False
    failing_paths: str = ""  # fail(): only requests whose path holds this
    faulted: int = 0  # requests answered with the fault
    # fail_after_upstream: (path fragment, status, answers left)
    after_upstream: tuple[str, int, int] | None = None
    # fail_before_upstream: (path fragment, status, answers left)
    before_upstream: tuple[str, int, int] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(
        self, status: int, body: str = '{"detail": "injected fault"}', path_fragment: str = ""
    ) -> None:
        """Answer ``status`` to every request (whose path holds ``path_fragment``)."""
        self.status, self.body, self.failing = status, body, True
        self.failing_paths = path_fragment

    def fail_after_upstream(self, path_fragment: str, status: int, times: int = 1) -> None:
        """The next ``times`` requests whose path holds ``path_fragment`` reach the
        server, which applies them, and then get ``status`` back instead of its
        answer: a 5xx after commit, or a reply lost on the way."""
        self.after_upstream = (path_fragment, status, times)

    def fail_before_upstream(self, path_fragment: str, status: int, times: int = 1) -> None:
        """The next ``times`` requests whose path holds ``path_fragment`` get ``status``
        without reaching the server: an error that changed nothing."""
        self.before_upstream = (path_fragment, status, times)

    def heal(self) -> None:
        self.failing = False
        self.after_upstream = self.before_upstream = None

    @staticmethod
    def _take(
        fault: tuple[str, int, int] | None, target: str
    ) -> tuple[bool, tuple[str, int, int] | None]:
        """Whether ``fault`` applies to ``target``, and the fault left after it."""
        if fault is None or fault[0] not in target:
            return False, fault
        fragment, status, times = fault
        return True, ((fragment, status, times - 1) if times > 1 else None)

    def answer(self, hit: Hit, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.failing and self.failing_paths in hit.target:
            self.faulted += 1
            return super().answer(hit, body)
        with self._lock:
            before = self.before_upstream
            hit_before, self.before_upstream = self._take(before, hit.target)
            self.faulted += hit_before
        if hit_before:
            assert before is not None
            return before[1], {"Content-Type": "application/json"}, INJECTED
        forwarded = self._forward(hit, body)
        with self._lock:
            after = self.after_upstream
            hit_after, self.after_upstream = self._take(after, hit.target)
            self.faulted += hit_after
        if not hit_after:
            return forwarded
        assert after is not None
        return after[1], {"Content-Type": "application/json"}, INJECTED

    def tunnel(self, handler: BaseHTTPRequestHandler) -> bool:
        """Pass a websocket upgrade (Prefect's events) through untouched: the faults
        are for the API's requests, and a worker cannot start a run without events."""
        if handler.headers.get("Upgrade", "").lower() != "websocket":
            return False
        parts = urlsplit(self.upstream)
        upstream = socket.create_connection((parts.hostname, parts.port or 80), timeout=30)
        head = f"{handler.requestline}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in handler.headers.items()
        )
        upstream.sendall(head.encode() + b"\r\n")
        upstream.settimeout(None)
        client = handler.connection

        def pipe(source: socket.socket, target: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while chunk := source.recv(65536):
                    target.sendall(chunk)
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        back.start()
        pipe(client, upstream)
        back.join()
        upstream.close()
        return True

    def _forward(self, hit: Hit, body: bytes) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in hit.headers.items() if k not in HOP_HEADERS}
        try:
            response = httpx.request(
                hit.method, self.upstream + hit.target, headers=headers, content=body, timeout=30
            )
        except httpx.TransportError as exc:  # upstream down: what a gateway says
            return 502, {"Content-Type": "text/plain"}, f"upstream: {exc!r}".encode()
        kept = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
        kept.pop("content-encoding", None)  # httpx has decoded the payload
        return response.status_code, kept, response.content
