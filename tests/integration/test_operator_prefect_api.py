"""The operator's Prefect adapter against loopback servers and a real Prefect server.

What a remote answers never reaches a status message; redirects are never
followed; requests (and the API key) go to the pool's own URL only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import kopf
import pytest
from recording_server import RecordingServer

from pgw_operator import handlers
from pgw_operator.api_url import AllowedApiUrls, parse_api_url
from pgw_operator.errors import PrefectError
from pgw_operator.prefect_api import BY_NAME_AT_MOST, REASONS, PrefectApi
from prefect_gpu_workers.server import LocalPrefectServer

MARKER = f"INTERNAL-SECRET-{uuid.uuid4().hex}"


async def call(api: PrefectApi, what: str) -> PrefectError:
    """Run one adapter call that must fail; its error."""
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "ensure_work_pool": lambda: api.ensure_work_pool("gpu"),
        # More names than are read one by one: the paged listing (one read by
        # name answers 404 for a limit that does not exist, which is no error).
        "read_limits": lambda: api.read_limits(
            {"gpu:a", *(f"gpu:{i}" for i in range(BY_NAME_AT_MOST))}
        ),
        "create_limit": lambda: api.create_limit("gpu:a", 1),
        "resize_limit": lambda: api.resize_limit("gpu:a", 1),
        "delete_limit": lambda: api.delete_limit("gpu:a"),
    }
    try:
        with pytest.raises(PrefectError) as info:
            await calls[what]()
    finally:
        await api.aclose()
    return info.value


CALLS = ["ensure_work_pool", "read_limits", "create_limit", "resize_limit", "delete_limit"]
FAILING = [
    (what, status)
    for what in CALLS
    for status in (400, 404, 409, 422, 500, 503)
    if (what, status) != ("delete_limit", 404)  # already gone: success
]


@pytest.mark.parametrize(("what", "status"), FAILING)
def test_error_messages_never_carry_the_response_body(
    status: int, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    body = json.dumps({"detail": MARKER}) + "x" * 500
    with RecordingServer(status, body).running() as server:
        api = PrefectApi(parse_api_url(f"{server.url}/internal/admin"))
        with caplog.at_level(logging.DEBUG, logger="pgw_operator.prefect_api"):
            error = asyncio.run(call(api, what))
    assert error.reason in REASONS
    assert MARKER not in str(error)
    assert f"HTTP {status}" in str(error)
    assert str(error).startswith("Prefect API ")
    # The operator's own path, never the pool's path or the remote's words.
    assert "/internal/admin" not in str(error)
    # The body goes to the operator's log only, trimmed.
    assert MARKER in caplog.text
    assert "x" * 450 not in "".join(r.getMessage() for r in caplog.records if r.levelno > 10)
    # Every request went below the pool's path, without a query.
    assert server.hits
    assert all(h.target.startswith("/internal/admin/") and "?" not in h.target for h in server.hits)


def test_a_2xx_answer_that_is_not_prefects_is_a_bad_response_without_its_body() -> None:
    body = json.dumps([{"name": "gpu:a", "limit": MARKER, "active": True, "active_slots": 0}])
    with RecordingServer(200, body).running() as server:
        error = asyncio.run(call(PrefectApi(parse_api_url(server.url)), "read_limits"))
    assert error.reason == "PrefectBadResponse"
    assert MARKER not in str(error)


def test_a_limit_read_by_name_that_is_not_prefects_is_a_bad_response_without_its_body() -> None:
    body = json.dumps({"name": "gpu:a", "limit": MARKER, "active": True, "active_slots": 0})

    async def read() -> PrefectError:
        api = PrefectApi(parse_api_url(server.url))
        try:
            with pytest.raises(PrefectError) as info:
                await api.read_limits({"gpu:a"})
        finally:
            await api.aclose()
        return info.value

    with RecordingServer(200, body).running() as server:
        error = asyncio.run(read())
    assert error.reason == "PrefectBadResponse"
    assert "GET /v2/concurrency_limits/gpu:a" in str(error)
    assert MARKER not in str(error)


def test_redirects_are_never_followed_and_the_key_goes_nowhere_else() -> None:
    with RecordingServer(200, "[]").running() as elsewhere:
        location = {"Location": f"{elsewhere.url}/api/work_pools/gpu"}
        with RecordingServer(302, "", headers=location).running() as pool_url:
            api = PrefectApi(parse_api_url(f"{pool_url.url}/api"), api_key="the-key")
            error = asyncio.run(call(api, "ensure_work_pool"))
            api = PrefectApi(parse_api_url(f"{pool_url.url}/api"), api_key="the-key")
            error_limits = asyncio.run(call(api, "read_limits"))
    assert (error.reason, error_limits.reason) == ("PrefectRedirected", "PrefectRedirected")
    assert "redirects are not followed" in str(error)
    assert elsewhere.hits == [], "a redirect was followed"
    assert {h.headers.get("authorization") for h in pool_url.hits} == {"Bearer the-key"}


def test_names_are_path_segments_never_queries(prefect_server: LocalPrefectServer) -> None:
    async def scenario() -> None:
        api = PrefectApi(parse_api_url(prefect_server.api_url))
        try:
            name = f"pool?x=1#y-{uuid.uuid4().hex[:6]}"
            assert await api.ensure_work_pool(name) is True
            assert await api.ensure_work_pool(name) is False  # read back by the same name
            limit = f"gpu:{uuid.uuid4().hex[:6]}"
            await api.create_limit(limit, 2)
            await api.create_limit(limit, 3)  # exists: resized (409 path)
            found = await api.read_limits({limit})
            assert found[limit].limit == 3
            await api.delete_limit(limit)
            await api.delete_limit(limit)  # already gone: fine
            assert await api.read_limits({limit}) == {}
        finally:
            await api.aclose()

    asyncio.run(scenario())


def deleted_pool(api_url: str, deleted_at: str, timeout_s: int = 600) -> kopf.Body:
    """A pool being deleted since ``deleted_at``, with two limits in its ledger."""
    workers = [{"limitName": f"gpu:{pod}", "pod": pod, "state": "Ready"} for pod in ("a", "b")]
    return kopf.Body(
        {
            "metadata": {
                "namespace": "ns",
                "name": f"p-{uuid.uuid4().hex[:6]}",
                "deletionTimestamp": deleted_at,
            },
            "spec": {
                "workPool": {"name": "p"},
                "prefect": {"apiUrl": api_url, "finalizerTimeoutSeconds": timeout_s},
                "gpu": {"perWorker": 1},
                "worker": {"image": "i"},
            },
            "status": {"workers": workers},
        }
    )


def rfc3339(seconds_ago: float) -> str:
    moment = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


class Events(list[tuple[str, str, str]]):
    def __call__(self, kind: str, reason: str, message: str) -> None:
        self.append((kind, reason, message))


def test_deleting_a_pool_whose_url_is_not_allowed_sends_no_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = Events()
    with RecordingServer(204, "").running() as server:
        body = deleted_pool(f"{server.url}/api", rfc3339(0))
        allowed = AllowedApiUrls.parse(["http://prefect.prefect.svc:4200/api"])
        with caplog.at_level(logging.WARNING, logger="test"):
            asyncio.run(
                handlers.delete_pool(body, logging.getLogger("test"), allowed, events, records={})
            )
    assert server.hits == []
    assert "ApiUrlNotAllowed" in caplog.text
    assert "gpu:a" in caplog.text  # the limits left behind are named
    ((kind, reason, message),) = events
    assert (kind, reason) == ("Warning", "LimitsLeftInPrefect")
    assert "ApiUrlNotAllowed" in message
    assert "gpu:a, gpu:b" in message


def test_a_pool_whose_limits_cannot_be_deleted_waits_until_its_finalizer_timeout_then_goes() -> (
    None
):
    """A Prefect that fails every delete holds the pool for
    ``finalizerTimeoutSeconds`` after the deletion began, not for ever: then the
    pool goes (no exception for kopf to retry) and an Event names what was left."""
    with RecordingServer(503, "").running() as server:
        url = f"{server.url}/api"
        allowed = AllowedApiUrls(allow_any=True)
        events = Events()
        early = deleted_pool(url, rfc3339(10), timeout_s=60)
        with pytest.raises(kopf.TemporaryError) as info:
            asyncio.run(
                handlers.delete_pool(early, logging.getLogger("test"), allowed, events, records={})
            )
        assert info.value.delay is not None
        assert 0 < info.value.delay <= 30
        ((kind, reason, message),) = events
        assert (kind, reason) == ("Warning", "PrefectServerError")
        assert "gives up at" in message

        events.clear()
        late = deleted_pool(url, rfc3339(61), timeout_s=60)
        asyncio.run(
            handlers.delete_pool(late, logging.getLogger("test"), allowed, events, records={})
        )
        ((kind, reason, message),) = events
        assert (kind, reason) == ("Warning", "LimitsLeftInPrefect")
        assert "finalizerTimeoutSeconds=60" in message
        assert "gpu:a, gpu:b" in message
    assert all(hit.method == "DELETE" for hit in server.hits)
