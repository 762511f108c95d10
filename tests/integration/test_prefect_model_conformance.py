"""The simulation's model of Prefect answers as the real server does.

``tests/slot_simulation`` proves the slot broker against
:class:`~slot_simulation.prefect_model.PrefectModel`, because the real server
cannot be driven through thousands of fault schedules. That is only worth
something while the model is right: each sequence here runs against the real
server (this session's, on PostgreSQL) and against the model, request by
request, and every answer must agree (status, and the fields the broker reads).
Lease and limit ids differ between the two, so answers are compared with ids
replaced by the names the sequence gave them.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from slot_simulation.prefect_model import BASE, PrefectModel, seeded_ids

from prefect_gpu_workers.server import LocalPrefectServer

RETRY_503_S = 30.0  # how long a 503 (rolled back, retry) is sent again
Step = tuple[str, str, Any]  # method, path below /v2/concurrency_limits, body


class Side:
    """One server (real or model) and the names a sequence gave its ids."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}  # id -> name in the sequence
        self.ids: dict[str, str] = {}  # name in the sequence -> id
        self._numbers = itertools.count(1)

    def call(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        raise NotImplementedError

    def create_limit(self, name: str, limit: int) -> None:
        raise NotImplementedError

    def deactivate(self, name: str) -> None:
        raise NotImplementedError

    def delete_limit(self, name: str) -> None:
        raise NotImplementedError

    def resolve(self, path: str, body: Any) -> tuple[str, Any]:
        """Put this side's ids in for the sequence's names (``{A}``)."""
        for name, value in self.ids.items():
            path = path.replace(f"{{{name}}}", value)
            if isinstance(body, dict):
                body = {k: (value if v == f"{{{name}}}" else v) for k, v in body.items()}
        return path, body

    def comparable(self, status: int, body: Any, save_as: str | None) -> tuple[int, Any]:
        """The answer with ids replaced by sequence names, and only what the broker reads."""
        if isinstance(body, dict) and "lease_id" in body and save_as:
            self.ids[save_as] = body["lease_id"]
            self.names[body["lease_id"]] = save_as
        return status, _strip(body, self.names)


def _strip(body: Any, names: dict[str, str]) -> Any:
    if isinstance(body, list):
        return [_strip(item, names) for item in body]
    if isinstance(body, dict):
        keep = {"lease_id", "limits", "name", "limit", "active", "active_slots"}
        return {k: names.get(v, "<id>") if k == "lease_id" else _strip(v, names)
                for k, v in body.items() if k in keep}  # fmt: skip
    return body


class RealSide(Side):
    def __init__(self, api_url: str, server: LocalPrefectServer | None = None) -> None:
        super().__init__()
        self.server = server
        self.http = httpx.Client(base_url=f"{api_url}/v2/concurrency_limits", timeout=30)

    def restart(self) -> None:
        assert self.server is not None, "a server of the test's own (the session's is shared)"
        self.server.stop()
        self.server.start(timeout_s=300)

    def send(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """One request, sent again while the server answers 503.

        Prefect answers 503 for errors it has rolled back and that a client may
        retry (on SQLite, ``database is locked`` while its own services write,
        most often in the seconds after a start), and Prefect's client retries
        them. The model has no such answer, so only the answer to the retried
        request is compared."""
        deadline = time.monotonic() + RETRY_503_S
        while True:
            response = self.http.request(method, path, json=body)
            if response.status_code != 503 or time.monotonic() > deadline:
                return response
            time.sleep(0.2)

    def call(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        response = self.send(method, path, body)
        return response.status_code, response.json() if response.content else None

    def create_limit(self, name: str, limit: int) -> None:
        self.send("POST", "/", {"name": name, "limit": limit}).raise_for_status()

    def deactivate(self, name: str) -> None:
        self.send("PATCH", f"/{name}", {"active": False}).raise_for_status()

    def delete_limit(self, name: str) -> None:
        self.send("DELETE", f"/{name}").raise_for_status()


class ModelSide(Side):
    def __init__(self, lease_storage: str = "memory") -> None:
        super().__init__()
        self.model = PrefectModel(lambda: 0.0, seeded_ids(random.Random(0)), lease_storage)

    def restart(self) -> None:
        self.model.restart()

    def call(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        answer = self.model.handle(method, f"{BASE}{path}", body)
        return answer.status, answer.body

    def create_limit(self, name: str, limit: int) -> None:
        self.model.create_limit(name, limit)

    def deactivate(self, name: str) -> None:
        self.model.limits[name].active = False

    def delete_limit(self, name: str) -> None:
        del self.model.limits[name]


@pytest.fixture
def sides(prefect_server: LocalPrefectServer) -> Iterator[tuple[Side, Side]]:
    real = RealSide(prefect_server.api_url)
    yield real, ModelSide()
    real.http.close()


def run_sequence(sides: tuple[Side, Side], script: list[Any]) -> list[str]:
    """Run ``script`` on both sides; return a line per step (for the failure message)."""
    lines = []
    for entry in script:
        kind = entry[0]
        if kind == "admin":
            _, action, *args = entry
            for side in sides:
                getattr(side, action)(*args)
            lines.append(f"{action} {args}")
            continue
        _, method, path, body, save_as = (*entry, None)[:5]
        answers = []
        for side in sides:
            real_path, real_body = side.resolve(path, body)
            status, answer = side.call(method, real_path, real_body)
            answers.append(side.comparable(status, answer, save_as))
        lines.append(f"{method} {path} {body} -> real {answers[0]} / model {answers[1]}")
        assert answers[0] == answers[1], "\n".join(lines)
    return lines


def test_leases_count_renew_release_and_go_as_on_the_real_server(
    sides: tuple[Side, Side],
) -> None:
    name = f"gpu:conf-{uuid.uuid4().hex[:8]}"
    take = {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": 60}
    run_sequence(sides, [
        ("admin", "create_limit", name, 2),
        ("call", "POST", "/increment-with-lease", take, "A"),
        ("call", "POST", "/increment-with-lease", take, "B"),
        ("call", "GET", f"/{name}", None),
        ("call", "POST", "/increment-with-lease", take),  # full: 423
        ("call", "POST", "/leases/{A}/renew", {"lease_duration": 300}),
        ("call", "POST", "/decrement-with-lease", {"lease_id": "{A}"}),
        ("call", "POST", "/decrement-with-lease", {"lease_id": "{A}"}),  # again: a no-op
        ("call", "POST", "/leases/{A}/renew", {"lease_duration": 300}),  # gone: 410
        ("call", "GET", f"/{name}", None),
        ("call", "POST", "/decrement", {"names": [name], "slots": 1, "occupancy_seconds": 1.0}),
        ("call", "GET", f"/{name}", None),
        ("call", "POST", "/decrement", {"names": [name], "slots": 1, "occupancy_seconds": 1.0}),
        ("call", "GET", f"/{name}", None),  # never below 0
        ("call", "POST", "/decrement-with-lease", {"lease_id": "{B}"}),  # B's slot was decremented
        ("call", "GET", f"/{name}", None),
    ])  # fmt: skip


def test_refusals_are_the_real_servers(sides: tuple[Side, Side]) -> None:
    name = f"gpu:conf-{uuid.uuid4().hex[:8]}"
    missing = f"gpu:conf-missing-{uuid.uuid4().hex[:8]}"
    run_sequence(sides, [
        ("admin", "create_limit", name, 2),
        # More slots than the limit, then a lease under Prefect's 60 s: both 422.
        ("call", "POST", "/increment-with-lease",
         {"names": [name], "slots": 3, "mode": "concurrency", "lease_duration": 60}),
        ("call", "POST", "/increment-with-lease",
         {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": 30}),
        # A missing limit: a lease of no limit (limits: []), not an error.
        ("call", "POST", "/increment-with-lease",
         {"names": [missing], "slots": 1, "mode": "concurrency", "lease_duration": 60}),
        ("call", "GET", f"/{missing}", None),  # 404
        ("call", "POST", f"/leases/{uuid.uuid4()}/renew", {"lease_duration": 60}),  # unknown: 410
        ("call", "POST", "/decrement", {"names": [missing], "slots": 1}),  # []
        ("call", "POST", "/increment", {"names": [name], "slots": 2, "mode": "concurrency"}),
        ("call", "POST", "/increment", {"names": [name], "slots": 1, "mode": "concurrency"}),  # 423
        ("call", "GET", f"/{name}", None),
    ])  # fmt: skip


def test_inactive_and_recreated_limits_count_as_on_the_real_server(
    sides: tuple[Side, Side],
) -> None:
    name = f"gpu:conf-{uuid.uuid4().hex[:8]}"
    take = {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": 60}
    run_sequence(sides, [
        ("admin", "create_limit", name, 1),
        ("call", "POST", "/increment-with-lease", take, "A"),
        ("admin", "delete_limit", name),
        ("admin", "create_limit", name, 1),
        ("call", "GET", f"/{name}", None),  # the new limit counts nothing
        ("call", "POST", "/decrement-with-lease", {"lease_id": "{A}"}),  # names the old limit
        ("call", "GET", f"/{name}", None),
        ("call", "POST", "/increment-with-lease", take, "B"),
        ("admin", "deactivate", name),
        ("call", "POST", "/increment-with-lease", take, "C"),  # inactive: granted, not counted
        ("call", "GET", f"/{name}", None),
        ("call", "POST", "/decrement-with-lease", {"lease_id": "{B}"}),  # inactive: not decremented
        ("call", "GET", f"/{name}", None),
    ])  # fmt: skip


def test_a_restart_keeps_the_file_storages_leases(tmp_path: Path) -> None:
    """Prefect's filesystem lease storage (the local server's default) keeps every
    lease across a restart: renewed after it, released by it. The memory storage
    forgets them all (renew: 410), which ``test_slot_broker``'s restart test and
    ``bench --faults`` drive against the real server."""
    server = LocalPrefectServer(home=tmp_path / "prefect", lease_storage="filesystem")
    server.start(timeout_s=300)  # a server of its own: the session's is shared
    real = RealSide(server.api_url, server)
    try:
        name = f"gpu:conf-{uuid.uuid4().hex[:8]}"
        take = {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": 60}
        run_sequence((real, ModelSide(lease_storage="file")), [
            ("admin", "create_limit", name, 2),
            ("call", "POST", "/increment-with-lease", take, "A"),
            ("admin", "restart"),
            ("call", "GET", f"/{name}", None),  # the count survives in the database
            ("call", "POST", "/leases/{A}/renew", {"lease_duration": 300}),  # kept: 204
            ("call", "POST", "/decrement-with-lease", {"lease_id": "{A}"}),
            ("call", "GET", f"/{name}", None),
        ])  # fmt: skip
    finally:
        real.http.close()
        server.stop()
