"""Thin async adapter to the Prefect REST API: global concurrency limits and work pools.

Talks HTTP directly (not through Prefect's global client settings) because each
pool may name its own API URL and key. Every failure becomes a
:class:`PrefectError` with a condition reason, so the reconciler can report it
instead of crashing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

import httpx

from pgw_operator.errors import PrefectError
from pgw_operator.plan import PrefectLimit

T = TypeVar("T")


async def gather_bounded(calls: Iterable[Awaitable[T]], parallel: int = 8) -> list[T]:
    """Await ``calls`` concurrently, at most ``parallel`` at a time, results in order."""
    gate = asyncio.Semaphore(parallel)

    async def one(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))


def _limit_from(body: dict[str, Any]) -> PrefectLimit:
    return PrefectLimit(
        name=body["name"],
        limit=int(body["limit"]),
        active=bool(body["active"]),
        active_slots=int(body["active_slots"]),
    )


class PrefectApi:
    def __init__(self, api_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api_url = api_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.api_url, headers=headers, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise PrefectError(
                "PrefectUnreachable", f"Prefect API {self.api_url} unreachable: {exc!r}"
            ) from exc
        if response.status_code in (401, 403):
            raise PrefectError(
                "PrefectUnauthorized",
                f"Prefect API refused {method} {path}: HTTP {response.status_code}; "
                "check spec.prefect.apiKeySecretRef",
            )
        if response.status_code >= 500:
            raise PrefectError(
                "PrefectServerError",
                f"Prefect API {method} {path}: HTTP {response.status_code} {response.text[:200]}",
            )
        return response

    async def _checked(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self._request(method, path, **kwargs)
        if response.status_code >= 400:
            raise PrefectError(
                "PrefectRejected",
                f"Prefect API {method} {path}: HTTP {response.status_code} {response.text[:300]}",
            )
        return response

    # Global concurrency limits -------------------------------------------------

    async def read_limits(self, names: set[str], page: int = 200) -> dict[str, PrefectLimit]:
        """The limits among ``names`` that exist, read a page of 200 at a time.

        One paged listing costs a request per 200 limits where reading by name
        costs one per pod, which made large scale-ups slow on a busy server.
        """
        found: dict[str, PrefectLimit] = {}
        offset = 0
        while names:
            response = await self._checked(
                "POST", "/v2/concurrency_limits/filter", json={"offset": offset, "limit": page}
            )
            items = response.json()
            for body in items:
                if body["name"] in names:
                    found[body["name"]] = _limit_from(body)
            if len(items) < page:
                break
            offset += page
        return found

    async def create_limit(self, name: str, size: int) -> None:
        body = {"name": name, "limit": size, "active": True}
        response = await self._request("POST", "/v2/concurrency_limits/", json=body)
        if response.status_code == 409:  # it exists after all (a page shifted): size it
            await self.resize_limit(name, size)
        elif response.status_code >= 400:
            raise PrefectError(
                "PrefectRejected",
                f"create limit {name}: HTTP {response.status_code} {response.text[:300]}",
            )

    async def resize_limit(self, name: str, size: int) -> None:
        await self._checked(
            "PATCH", f"/v2/concurrency_limits/{name}", json={"limit": size, "active": True}
        )

    async def delete_limit(self, name: str) -> None:
        response = await self._request("DELETE", f"/v2/concurrency_limits/{name}")
        if response.status_code not in (204, 404):
            raise PrefectError(
                "PrefectRejected", f"delete limit {name}: HTTP {response.status_code}"
            )

    async def recreate_limit(self, name: str, size: int) -> None:
        """Drop every slot held under ``name``: leases of the old limit cannot touch the new one."""
        await self.delete_limit(name)
        await self.create_limit(name, size)

    # Work pools ----------------------------------------------------------------

    async def ensure_work_pool(self, name: str, pool_type: str = "process") -> bool:
        """Create the work pool if missing; True when it was created."""
        response = await self._request("GET", f"/work_pools/{name}")
        if response.status_code == 200:
            return False
        if response.status_code != 404:
            raise PrefectError(
                "PrefectRejected", f"read work pool {name}: HTTP {response.status_code}"
            )
        created = await self._request(
            "POST", "/work_pools/", json={"name": name, "type": pool_type}
        )
        if created.status_code == 409:  # created concurrently
            return False
        if created.status_code >= 400:
            raise PrefectError(
                "WorkPoolRejected",
                f"create work pool {name}: HTTP {created.status_code} {created.text[:300]}",
            )
        return True
