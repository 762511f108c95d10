"""Thin async adapter to the Prefect REST API: limits, work pools, a work pool's backlog.

Talks HTTP directly (not through Prefect's global client settings) because each
pool may name its own API URL and key. Every failure becomes a
:class:`PrefectError` with a reason from a fixed set (see ``REASONS``) and a
message made of the method, the operator's own path and the status code:
response bodies never reach status or Events (the pool's owner reads those and
picks the URL), only this module's log.

Every request URL is built by :meth:`ApiUrl.request_url` from the pool's
validated URL and redirects are never followed, so requests, and the API key,
go to the pool's own URL only.

The URL is the pool owner's choice, so its answers are read as a stranger's:
each call has a total deadline (httpx's timeout is per phase: a byte every few
seconds would hold a pass for ever), an answer is read only up to
:data:`MAX_BODY_BYTES` (never whole first), uncompressed, and a listing stops
after :data:`MAX_PAGES` pages.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import httpx

from pgw_operator import metrics
from pgw_operator.api_url import DEFAULT_PORTS, ApiUrl
from pgw_operator.autoscale import Backlog
from pgw_operator.errors import PrefectError
from pgw_operator.plan import PrefectLimit

T = TypeVar("T")

# Not kopf's per-object logger: that one posts its records as Events.
log = logging.getLogger(__name__)

REASONS = frozenset({
    "PrefectUnreachable",  # transport error, timeout
    "PrefectUnauthorized",  # 401, 403
    "PrefectRedirected",  # 3xx: never followed
    "PrefectServerError",  # 5xx
    "PrefectRejected",  # another 4xx
    "PrefectBadResponse",  # 2xx whose body is not what the API returns
    "WorkPoolRejected",  # creating the work pool failed with a 4xx
})  # fmt: skip
LOGGED_BODY_CHARS = 200  # at WARNING; the rest, up to DEBUG_BODY_CHARS, at DEBUG
DEBUG_BODY_CHARS = 4000
# Prefect's largest answer the operator reads is a page of 200 limits (about
# 60 kB) or a work pool with its base job template: a few MB is far past both.
MAX_BODY_BYTES = 4 * 1024 * 1024
# A page of 200 limits each: 20,000 limits, twenty times a 1000-pod fleet's.
MAX_PAGES = 100
# Up to this many limits are read one GET each (a pass over a few pods, a small
# pool's full pass); more, a page of 200 at a time. Pages list every limit in
# Prefect, not only the pool's: 100 pools of 10 paging through 1000 limits
# every resync cost Prefect more than their own 10 GETs each.
BY_NAME_AT_MOST = 50
# The longest one call may take, connect to last byte.
CALL_DEADLINE_S = 30.0
# Requests in flight at once from this process, over every pool: 100 pools
# scaling at once must queue here, not time out in an overloaded Prefect server.
MAX_IN_FLIGHT = 16
_IN_FLIGHT: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _in_flight() -> asyncio.Semaphore:
    """The running loop's bound (a semaphore belongs to one loop; tests run several)."""
    loop = asyncio.get_running_loop()
    if loop not in _IN_FLIGHT:
        _IN_FLIGHT[loop] = asyncio.Semaphore(MAX_IN_FLIGHT)
    return _IN_FLIGHT[loop]


class _TooLarge(Exception):
    pass


async def _read_capped(response: httpx.Response, cap: int) -> bytes:
    """The answer's body, or :class:`_TooLarge` as soon as it passes ``cap`` bytes."""
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise _TooLarge
    encoding = response.headers.get("content-encoding", "identity").lower()
    if encoding not in ("", "identity"):
        # Asked for none: a compressed answer could inflate far past the cap
        # from one small chunk.
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > cap:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def gather_bounded(calls: Iterable[Awaitable[T]], parallel: int = 8) -> list[T]:
    """Await ``calls`` concurrently, at most ``parallel`` at a time, results in order."""
    gate = asyncio.Semaphore(parallel)

    async def one(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))


def _limit_from(body: dict[str, Any]) -> PrefectLimit:
    return PrefectLimit(
        name=str(body["name"]),
        limit=int(body["limit"]),
        active=bool(body["active"]),
        active_slots=int(body["active_slots"]),
    )


def _error(reason: str, method: str, path: str, status: int, hint: str = "") -> PrefectError:
    return PrefectError(reason, f"Prefect API {method} {path}: HTTP {status}{hint}")


class PrefectApi:
    """Prefect REST calls against one pool's validated API URL.

    Args:
        base: the pool's URL, checked by :meth:`AllowedApiUrls.check`.
        api_key: sent as a bearer token, to ``base`` only.
        timeout_s: httpx's bound on each phase (connect, each read, ...).
        deadline_s: the bound on a whole call, connect to last byte.
        max_body_bytes: the largest answer read; a larger one is a bad response.
    """

    def __init__(
        self,
        base: ApiUrl,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        deadline_s: float = CALL_DEADLINE_S,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        headers = {"Accept-Encoding": "identity"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base = base
        self.deadline_s = deadline_s
        self.max_body_bytes = max_body_bytes
        # No base_url (whose merging re-reads the path) and no redirects.
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout_s, follow_redirects=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    def _url(self, segments: tuple[str, ...]) -> httpx.URL:
        url = httpx.URL(self.base.request_url(*segments))
        # Belt and braces: the URL httpx will use names the validated origin.
        origin = (url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme))
        if origin != (self.base.scheme, self.base.host, self.base.port):
            raise PrefectError("ApiUrlInvalid", f"request URL for {self.base} changed origin")
        return url

    async def _request(
        self, method: str, *segments: str, json: Any = None, ok: tuple[int, ...] = ()
    ) -> httpx.Response:
        """Send one request; any status but 2xx and ``ok`` raises a PrefectError."""
        path = "/" + "/".join(segments)  # the operator's own path, for messages
        async with _in_flight():
            return await self._request_now(method, path, segments, json, ok)

    async def _request_now(
        self, method: str, path: str, segments: tuple[str, ...], json: Any, ok: tuple[int, ...]
    ) -> httpx.Response:
        metrics.PREFECT_REQUESTS.labels(method).inc()
        try:
            async with asyncio.timeout(self.deadline_s):
                url = self._url(segments)
                async with self._http.stream(method, url, json=json) as streamed:
                    body = await _read_capped(streamed, self.max_body_bytes)
            response = httpx.Response(streamed.status_code, headers=streamed.headers, content=body)
        except TimeoutError as exc:
            log.warning("Prefect API %s %s%s: no whole answer within %g s",
                        method, self.base, path, self.deadline_s)  # fmt: skip
            raise PrefectError(
                "PrefectUnreachable",
                f"Prefect API {method} {path}: no whole answer within {self.deadline_s:g} s",
            ) from exc
        except _TooLarge as exc:
            log.warning("Prefect API %s %s%s: answer over %d bytes (or compressed), not read",
                        method, self.base, path, self.max_body_bytes)  # fmt: skip
            raise PrefectError(
                "PrefectBadResponse",
                f"Prefect API {method} {path}: the answer is larger than "
                f"{self.max_body_bytes} bytes; not a Prefect API response",
            ) from exc
        except httpx.TransportError as exc:
            log.warning("Prefect API %s %s%s unreachable: %r", method, self.base, path, exc)
            raise PrefectError(
                "PrefectUnreachable",
                f"Prefect API {method} {path}: unreachable ({type(exc).__name__})",
            ) from exc
        status = response.status_code
        if 200 <= status < 300 or status in ok:
            return response
        self._log_body(method, path, response)
        if status in (401, 403):
            raise _error("PrefectUnauthorized", method, path, status,
                         "; check spec.prefect.apiKeySecretRef")  # fmt: skip
        if 300 <= status < 400:
            hint = "; redirects are not followed: set spec.prefect.apiUrl to the final URL"
            raise _error("PrefectRedirected", method, path, status, hint)
        if status >= 500:
            raise _error("PrefectServerError", method, path, status)
        raise _error("PrefectRejected", method, path, status)

    def _log_body(self, method: str, path: str, response: httpx.Response) -> None:
        """The answer's body, for the operator's log only (trimmed; long ones at DEBUG)."""
        body = response.text
        log.warning(
            "Prefect API %s %s%s answered HTTP %s: %r%s", method, self.base, path,
            response.status_code, body[:LOGGED_BODY_CHARS],
            " (trimmed; full body at debug level)" if len(body) > LOGGED_BODY_CHARS else "",
        )  # fmt: skip
        if len(body) > LOGGED_BODY_CHARS:
            log.debug("Prefect API %s %s%s body: %r", method, self.base, path,
                      body[:DEBUG_BODY_CHARS])  # fmt: skip

    def _bad_response(self, method: str, path: str, response: httpx.Response) -> PrefectError:
        self._log_body(method, path, response)
        return _error("PrefectBadResponse", method, path, response.status_code,
                      "; the answer is not a Prefect API response")  # fmt: skip

    # Global concurrency limits -------------------------------------------------

    async def read_limits(self, names: set[str], page: int = 200) -> dict[str, PrefectLimit]:
        """The limits among ``names`` that exist: a few read by name, more a page
        of 200 at a time (one request per 200 limits where reading by name costs one
        per limit, which made large scale-ups slow on a busy server)."""
        if len(names) <= BY_NAME_AT_MOST:
            return await self._read_limits_by_name(names)
        return await self._read_limit_pages(names, page)

    async def _read_limits_by_name(self, names: set[str]) -> dict[str, PrefectLimit]:
        async def one(name: str) -> PrefectLimit | None:
            path = ("v2", "concurrency_limits", name)
            response = await self._request("GET", *path, ok=(404,))
            if response.status_code == 404:
                return None
            try:
                return _limit_from(response.json())
            except (ValueError, KeyError, TypeError) as exc:
                raise self._bad_response("GET", "/" + "/".join(path), response) from exc

        found = await gather_bounded(one(name) for name in sorted(names))
        return {limit.name: limit for limit in found if limit is not None and limit.name in names}

    async def _read_limit_pages(self, names: set[str], page: int) -> dict[str, PrefectLimit]:
        found: dict[str, PrefectLimit] = {}
        offset = 0
        segments = ("v2", "concurrency_limits", "filter")
        for _ in range(MAX_PAGES):
            if not names:
                break
            response = await self._request(
                "POST", *segments, json={"offset": offset, "limit": page}
            )
            try:
                items = response.json()
                if not isinstance(items, list):
                    raise TypeError("not a list")
                for body in items:
                    if body["name"] in names:
                        found[body["name"]] = _limit_from(body)
            except (ValueError, KeyError, TypeError) as exc:
                raise self._bad_response("POST", "/" + "/".join(segments), response) from exc
            if len(items) < page:
                return found
            offset += page
        if not names:
            return found
        log.warning("Prefect API %s: still full pages after %d; not read on", self.base, MAX_PAGES)
        raise PrefectError(
            "PrefectBadResponse",
            f"Prefect API POST /{'/'.join(segments)}: more than {MAX_PAGES} pages of "
            f"{page} limits; not read on",
        )

    async def create_limit(self, name: str, size: int) -> None:
        body = {"name": name, "limit": size, "active": True}
        response = await self._request("POST", "v2", "concurrency_limits", "", json=body, ok=(409,))
        if response.status_code == 409:  # it exists after all (a page shifted): size it
            await self.resize_limit(name, size)

    async def resize_limit(self, name: str, size: int) -> None:
        await self._request(
            "PATCH", "v2", "concurrency_limits", name, json={"limit": size, "active": True}
        )

    async def delete_limit(self, name: str) -> None:
        await self._request("DELETE", "v2", "concurrency_limits", name, ok=(404,))

    async def recreate_limit(self, name: str, size: int) -> None:
        """Drop every slot held under ``name``: leases of the old limit cannot touch the new one."""
        await self.delete_limit(name)
        await self.create_limit(name, size)

    # Work pools ----------------------------------------------------------------

    async def ensure_work_pool(self, name: str, pool_type: str = "process") -> bool:
        """Create the work pool if missing; True when it was created."""
        response = await self._request("GET", "work_pools", name, ok=(404,))
        if response.status_code != 404:
            return False
        try:
            created = await self._request(
                "POST", "work_pools", "", json={"name": name, "type": pool_type}, ok=(409,)
            )
        except PrefectError as exc:
            if exc.reason == "PrefectRejected":
                raise PrefectError("WorkPoolRejected", str(exc)) from exc
            raise
        return created.status_code != 409  # 409: created concurrently

    # Backlog -------------------------------------------------------------------

    async def read_backlog(
        self, work_pool: str, due_before: datetime, work_queues: Sequence[str] = ()
    ) -> Backlog:
        """Flow runs of ``work_pool`` that need a worker, counted by state type.

        Three ``POST /flow_runs/count`` calls: SCHEDULED runs due by
        ``due_before`` (Late and AwaitingRetry are SCHEDULED too; runs scheduled
        later do not count), PENDING and RUNNING runs. ``work_queues`` limits
        the count to those queues of the pool (all of them when empty).

        Raises:
            PrefectError: Prefect is unreachable, refuses the key, or rejects the filter.

        Example:
            >>> backlog = await api.read_backlog("gpu", datetime.now(UTC))  # doctest: +SKIP
        """
        scope: dict[str, Any] = {"work_pools": {"name": {"any_": [work_pool]}}}
        if work_queues:
            scope["work_pool_queues"] = {"name": {"any_": list(work_queues)}}
        due = {"next_scheduled_start_time": {"before_": due_before.isoformat()}}
        scheduled, pending, running = await asyncio.gather(
            self._count_runs(scope, "SCHEDULED", due),
            self._count_runs(scope, "PENDING"),
            self._count_runs(scope, "RUNNING"),
        )
        return Backlog(scheduled=scheduled, pending=pending, running=running)

    async def _count_runs(
        self, scope: dict[str, Any], state_type: str, extra: dict[str, Any] | None = None
    ) -> int:
        flow_runs = {"state": {"type": {"any_": [state_type]}}, **(extra or {})}
        segments = ("flow_runs", "count")
        response = await self._request("POST", *segments, json={**scope, "flow_runs": flow_runs})
        try:
            count = response.json()
            if not isinstance(count, int) or isinstance(count, bool):
                raise TypeError("not an integer")
        except (ValueError, TypeError) as exc:
            raise self._bad_response("POST", "/" + "/".join(segments), response) from exc
        return count
