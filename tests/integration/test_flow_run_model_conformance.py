"""The simulation's model of Prefect's flow-run API answers as the real server does.

``tests/slot_simulation/workers.py`` drains, kills and restarts workers against
:class:`~slot_simulation.prefect_model.PrefectModel`'s flow runs. The same
sequence runs here through Prefect's real client against this session's real
server and against the model, and what the drain reads back must agree: which
runs are found, their state, labels and job variables, and what a forced state
set does.

Surprises worth knowing: a run's ``state_type`` and ``state_name`` are fields of
their own, filled by the server (the drain reads ``state_type``; the model first
left them empty, and this test caught it); ``set_state`` with ``force=True`` takes any transition
(Crashed -> Scheduled included) and answers 201 with ``ACCEPT``; reading by
ids leaves unknown ids out rather than failing; a state set on an unknown run
is a 404 (``ObjectNotFound`` in the client).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.exceptions import ObjectNotFound
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
    temporary_settings,
)
from prefect.states import Crashed, Scheduled
from slot_simulation.prefect_model import (
    FaultRates,
    ModelFlowRun,
    ModelTransport,
    PrefectModel,
    seeded_ids,
)

from prefect_gpu_workers.server import LocalPrefectServer
from prefect_gpu_workers.worker.drain import SIGTERM_BEHAVIOR_ENV, WORKER_NAME_LABEL

WORKER = "conformance-worker"
ENV = {SIGTERM_BEHAVIOR_ENV: "reschedule"}


async def _read(client: PrefectClient, ids: list[uuid.UUID]) -> list[tuple[Any, ...]]:
    runs = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids)
    )
    return sorted(
        (
            run.state_type.value if run.state_type else None,
            run.state_name,
            run.state.message if run.state else None,
            (run.labels or {}).get(WORKER_NAME_LABEL),
            (run.job_variables or {}).get("env"),
        )
        for run in runs
    )


async def _sequence(client: PrefectClient, run_id: uuid.UUID) -> list[Any]:
    """What the drain and the settle do, and what each step reads back."""
    unknown = uuid.uuid4()
    seen: list[Any] = [await _read(client, [run_id, unknown])]
    crashed: Any = await client.set_flow_run_state(run_id, Crashed(message="stopped"), force=True)
    seen += [crashed.status.value, await _read(client, [run_id])]
    again: Any = Scheduled(name="Rescheduled", message="drained")
    rescheduled = await client.set_flow_run_state(run_id, again, force=True)
    seen += [rescheduled.status.value, await _read(client, [run_id])]
    with pytest.raises(ObjectNotFound):
        await client.set_flow_run_state(unknown, Crashed(message="x"), force=True)
    return seen


async def _on_real_server(api_url: str) -> list[Any]:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        flow = await http.post("/flows/", json={"name": f"conformance-{uuid.uuid4().hex[:8]}"})
        flow.raise_for_status()
        created = await http.post(
            "/flow_runs/",
            json={
                "flow_id": flow.json()["id"],
                "state": {"type": "RUNNING", "name": "Running"},
                "labels": {WORKER_NAME_LABEL: WORKER},
                "job_variables": {"env": ENV},
            },
        )
        created.raise_for_status()
    run_id = uuid.UUID(created.json()["id"])
    async with get_client() as client:
        return await _sequence(client, run_id)


async def _on_model(api_url: str) -> list[Any]:
    model = PrefectModel(lambda: 0.0, seeded_ids(random.Random(0)))
    run = ModelFlowRun(model.new_id(), "RUNNING", "Running", labels={WORKER_NAME_LABEL: WORKER},
                       env=dict(ENV))  # fmt: skip
    model.flow_runs[run.id] = run
    transport = ModelTransport(model, random.Random(0), FaultRates())
    async with get_client(httpx_settings={"transport": transport}) as client:
        return await _sequence(client, run.id)


def test_flow_runs_read_and_forced_states_as_on_the_real_server(
    prefect_server: LocalPrefectServer,
) -> None:
    api_url = prefect_server.api_url
    # No CSRF token: the model serves only what the drain calls.
    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: False}):
        real = asyncio.run(_on_real_server(api_url))
        model = asyncio.run(_on_model(api_url))
    assert real == model
    # And the sequence did what it says (not two sides equally wrong).
    assert real[0] == [("RUNNING", "Running", None, WORKER, ENV)]
    assert real[1] == "ACCEPT"
    assert real[2][0][:3] == ("CRASHED", "Crashed", "stopped")
    assert real[4][0][:3] == ("SCHEDULED", "Rescheduled", "drained")
