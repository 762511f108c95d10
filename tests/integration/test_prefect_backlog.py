"""The operator's backlog read against a real Prefect server."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import State
from prefect.client.schemas.responses import SetStateStatus
from prefect.states import Cancelled, Completed, Late, Pending, Running, Scheduled

from pgw_operator.api_url import parse_api_url
from pgw_operator.autoscale import Backlog
from pgw_operator.errors import PrefectError
from pgw_operator.prefect_api import PrefectApi
from prefect_gpu_workers.server import LocalPrefectServer


class Runs:
    """Flow runs of one deployment per queue, put in any state.

    Through Prefect's client, which retries what a busy SQLite server answers
    with 503.
    """

    def __init__(self, prefect: SyncPrefectClient, work_pool: str, queues: list[str]) -> None:
        self.prefect = prefect
        prefect.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))
        flow_id = prefect.create_flow_from_name(f"flow-{work_pool}")
        self.deployments: dict[str, UUID] = {}
        for queue in queues:
            prefect.create_work_queue(queue, work_pool_name=work_pool)
            self.deployments[queue] = prefect.create_deployment(
                flow_id, f"dep-{queue}", work_pool_name=work_pool, work_queue_name=queue
            )

    def add(
        self, queue: str, count: int, state: State[Any] | None = None, at: datetime | None = None
    ) -> None:
        """``count`` runs scheduled at ``at`` (now), then forced into ``state`` if given."""
        for _ in range(count):
            run = self.prefect.create_flow_run_from_deployment(
                self.deployments[queue], state=Scheduled(scheduled_time=at or datetime.now(UTC))
            )
            if state is not None:
                result = self.prefect.set_flow_run_state(run.id, state, force=True)
                assert result.status == SetStateStatus.ACCEPT, result


def read(api_url: str, work_pool: str, queues: tuple[str, ...] = (), ahead_s: int = 0) -> Backlog:
    async def go() -> Backlog:
        api = PrefectApi(parse_api_url(api_url))
        try:
            due = datetime.now(UTC) + timedelta(seconds=ahead_s)
            return await api.read_backlog(work_pool, due, queues)
        finally:
            await api.aclose()

    return asyncio.run(go())


def test_backlog_counts_due_pending_and_running_runs_of_the_pool_only(
    prefect_server: LocalPrefectServer,
) -> None:
    pool, other = f"backlog-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    assert read(prefect_server.api_url, pool) == Backlog()  # no such pool yet: nothing
    with get_client(sync_client=True) as prefect:
        runs = Runs(prefect, pool, ["high", "low"])
        runs.add("high", 4)  # due now
        runs.add("high", 2, Late(scheduled_time=datetime.now(UTC) - timedelta(minutes=5)))
        runs.add("low", 3, Pending())
        runs.add("low", 1, Running())
        runs.add("high", 2, Running())
        # Not a backlog: finished, cancelled, and scheduled for much later.
        runs.add("high", 2, Completed())
        runs.add("low", 1, Cancelled())
        runs.add("low", 5, at=datetime.now(UTC) + timedelta(hours=2))
        # Another pool's runs never count.
        Runs(prefect, other, ["main"]).add("main", 6)

    url = prefect_server.api_url
    assert read(url, pool) == Backlog(scheduled=6, pending=3, running=3)
    assert read(url, pool, ("high",)) == Backlog(scheduled=6, pending=0, running=2)
    assert read(url, pool, ("low",)) == Backlog(scheduled=0, pending=3, running=1)
    # Looking three hours ahead, the later runs count as well.
    assert read(url, pool, ("low",), ahead_s=3 * 3600) == Backlog(scheduled=5, pending=3, running=1)
    assert read(url, other).total == 6


def test_an_unreachable_server_is_a_prefect_error() -> None:
    with pytest.raises(PrefectError) as info:
        read("http://127.0.0.1:9/api", "any")
    assert info.value.reason == "PrefectUnreachable"
