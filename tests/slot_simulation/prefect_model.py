"""A model of Prefect 3's global concurrency limits and leases, and the faults of its API.

Only what the slot broker calls, as Prefect's server answers it (``prefect/server/
api/concurrency_limits_v2.py``, the memory lease storage and the repossessor):

- ``increment-with-lease`` counts the slots in the database, then stores the lease
  (the limits of the lease are every limit named, active or not; only active ones
  are counted); 423 with Retry-After when an active limit has no room; 422 when
  a limit is smaller than the slots asked for; a missing limit gives a lease with
  no limits (``limits: []``).
- ``leases/{id}/renew`` 204, or 410 for a lease the storage does not hold (an
  expired lease not yet repossessed can still be renewed).
- ``decrement-with-lease`` decrements the lease's active limits (never below 0)
  and revokes the lease; an unknown lease is a 204 that does nothing.
- ``decrement`` by name, never below 0.
- a restart forgets every lease with the memory lease storage and keeps them
  with the file one; the counts live in the database and survive it. The
  repossessor decrements and revokes expired leases.

And what a draining worker calls (``worker.drain``, ``settle_left_behind``):

- ``flow_runs/filter`` by ids: the runs the server has (unknown ids left out),
  with their state, labels and job variables;
- ``flow_runs/{id}/set_state`` with ``force``: the state is taken as given
  (201, ``ACCEPT``); 404 for an unknown run.

The real server runs the same sequences in ``tests/integration/
test_prefect_model_conformance.py``; where they differ, the model is wrong.

:class:`ModelTransport` puts the model behind Prefect's real client (an httpx
transport) and injects faults per request: a refused connection (nothing
applied), an error before the handler (nothing applied), an error after it
(applied), a lost answer (applied; the client times out) and latency.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import httpx

BASE = "/api/v2/concurrency_limits"
FLOW_RUNS = "/api/flow_runs"
_SET_STATE = re.compile(rf"^{FLOW_RUNS}/([0-9a-f-]+)/set_state$")
SLOW_ANSWER_S = 10.0  # the longest a slow answer takes
_RENEW = re.compile(rf"^{BASE}/leases/([0-9a-f-]+)/renew$")


@dataclass
class ModelLimit:
    id: UUID
    name: str
    limit: int
    active: bool = True
    active_slots: int = 0


@dataclass
class ModelLease:
    id: UUID
    limit_ids: tuple[UUID, ...]
    slots: int
    expires_at: float


@dataclass
class ModelFlowRun:
    id: UUID
    state_type: str  # Prefect's StateType value: RUNNING, CRASHED, ...
    state_name: str
    message: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # its job variables' env
    set_by_api: int = 0  # states set through the API (a drain's, a settle's)

    def as_json(self) -> dict[str, Any]:
        """The run as the API returns it (Prefect's own schema fills the rest)."""
        from prefect.client.schemas.objects import FlowRun, State, StateType

        state = State(type=StateType(self.state_type), name=self.state_name, message=self.message)
        run = FlowRun(
            id=self.id,
            flow_id=UUID(int=1),
            name=f"run-{self.id.hex[:6]}",
            state=state,
            state_type=state.type,  # the server fills both from the state
            state_name=state.name,
            labels=dict(self.labels),
            job_variables={"env": dict(self.env)},
        )
        return run.model_dump(mode="json")


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class LeaseFate(enum.Enum):
    """How a lease the model handed out ended."""

    RELEASED = "released"  # decrement-with-lease
    FORGOTTEN = "forgotten"  # a restart of the memory lease storage
    REPOSSESSED = "repossessed"  # expired, and the repossessor decremented it


@dataclass(frozen=True)
class Ended:
    """How and when a lease ended."""

    fate: LeaseFate
    at: float
    lease: ModelLease


class PrefectModel:
    """The state of one Prefect server's limits and leases.

    Args:
        clock: the server's clock (the simulation's virtual time).
        new_id: where ids come from (seeded, so that a run replays exactly).
        lease_storage: ``memory`` (a restart forgets every lease) or ``file``.
    """

    def __init__(
        self, clock: Callable[[], float], new_id: Callable[[], UUID], lease_storage: str = "memory"
    ) -> None:
        self.clock = clock
        self.lease_storage = lease_storage
        self.new_id = new_id
        self.limits: dict[str, ModelLimit] = {}
        self.leases: dict[UUID, ModelLease] = {}
        self.ended: dict[UUID, Ended] = {}
        self.flow_runs: dict[UUID, ModelFlowRun] = {}
        self.recreated_at: list[float] = []
        self.up = True

    # -- what an administrator does ------------------------------------------
    def create_limit(self, name: str, limit: int) -> ModelLimit:
        created = self.limits[name] = ModelLimit(self.new_id(), name, limit)
        return created

    def resize(self, name: str, limit: int) -> None:
        self.limits[name].limit = limit

    def recreate_limit(self, name: str) -> None:
        """Deleted and created again: a new id, nothing counted; the old leases
        name a limit that no longer exists and count nothing."""
        self.create_limit(name, self.limits[name].limit)
        self.recreated_at.append(self.clock())

    def counts_anything(self, lease: ModelLease) -> bool:
        ids = {limit.id for limit in self.limits.values()}
        return any(limit_id in ids for limit_id in lease.limit_ids)

    def restart(self) -> None:
        """The memory lease storage starts empty; the file one and the database's
        counts are kept."""
        if self.lease_storage == "file":
            return
        now = self.clock()
        for lease in self.leases.values():
            self.ended[lease.id] = Ended(LeaseFate.FORGOTTEN, now, lease)
        self.leases.clear()

    def repossess(self) -> list[ModelLease]:
        """One pass of the repossessor: expired leases are decremented and revoked."""
        now = self.clock()
        expired = [lease for lease in self.leases.values() if lease.expires_at < now]
        for lease in expired:
            self._decrement_ids(lease.limit_ids, lease.slots)
            del self.leases[lease.id]
            self.ended[lease.id] = Ended(LeaseFate.REPOSSESSED, now, lease)
        return expired

    def counted(self, name: str) -> int:
        limit = self.limits.get(name)
        return limit.active_slots if limit is not None else 0

    # -- the API ---------------------------------------------------------------
    def handle(self, method: str, path: str, body: Any) -> Answer:
        """Answer one request, as the server's route would."""
        if method == "GET" and path.startswith(f"{BASE}/"):
            return self._read(path.removeprefix(f"{BASE}/"))
        if method != "POST":
            return Answer(405, {"detail": "Method Not Allowed"})
        if path == f"{FLOW_RUNS}/filter":
            return self._read_flow_runs(body)
        if match := _SET_STATE.match(path):
            return self._set_state(UUID(match.group(1)), body)
        if path == f"{BASE}/increment-with-lease":
            return self._increment(body, with_lease=True)
        if path == f"{BASE}/increment":
            return self._increment(body, with_lease=False)
        if path == f"{BASE}/decrement-with-lease":
            return self._decrement_with_lease(body)
        if path == f"{BASE}/decrement":
            return self._decrement(body)
        if match := _RENEW.match(path):
            return self._renew(UUID(match.group(1)), body)
        return Answer(404, {"detail": "Not Found"})

    def _read_flow_runs(self, body: dict[str, Any]) -> Answer:
        wanted = (((body or {}).get("flow_runs") or {}).get("id") or {}).get("any_") or []
        runs = [self.flow_runs[UUID(i)] for i in wanted if UUID(i) in self.flow_runs]
        return Answer(200, [run.as_json() for run in runs][: body.get("limit") or None])

    def _set_state(self, run_id: UUID, body: dict[str, Any]) -> Answer:
        run = self.flow_runs.get(run_id)
        if run is None:
            return Answer(404, {"detail": "Flow run not found"})
        state = body["state"]
        run.state_type, run.state_name = state["type"], state.get("name") or state["type"]
        run.message = state.get("message")
        run.set_by_api += 1
        return Answer(
            201, {"status": "ACCEPT", "state": state, "details": {"type": "accept_details"}}
        )

    def _read(self, name_or_id: str) -> Answer:
        limit = self.limits.get(name_or_id) or next(
            (x for x in self.limits.values() if str(x.id) == name_or_id), None
        )
        if limit is None:
            return Answer(404, {"detail": "Concurrency Limit not found"})
        stamp = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
        return Answer(
            200,
            {
                "id": str(limit.id),
                "created": stamp,
                "updated": stamp,
                "active": limit.active,
                "name": limit.name,
                "limit": limit.limit,
                "active_slots": limit.active_slots,
                "slot_decay_per_second": 0.0,
            },
        )

    def _increment(self, body: dict[str, Any], with_lease: bool) -> Answer:
        slots, names = body.get("slots", 0), body.get("names") or []
        duration = float(body.get("lease_duration", 300))
        if slots <= 0 or not names or (with_lease and not 60 <= duration <= 86400):
            return Answer(422, {"detail": "invalid request"})
        limits = [self.limits[n] for n in names if n in self.limits]
        active = [limit for limit in limits if limit.active]
        if any(limit.limit < slots for limit in active):
            return Answer(422, {"detail": "Slots requested is greater than the limit"})
        if any(limit.active_slots + slots > limit.limit for limit in active):
            return Answer(423, {"detail": "Concurrency limit is locked"}, {"Retry-After": "1.0"})
        for limit in active:
            limit.active_slots += slots
        minimal = [{"id": str(x.id), "name": x.name, "limit": x.limit} for x in limits]
        if not with_lease:
            return Answer(200, minimal)
        lease = ModelLease(
            self.new_id(), tuple(x.id for x in limits), slots, self.clock() + duration
        )
        self.leases[lease.id] = lease
        return Answer(200, {"lease_id": str(lease.id), "limits": minimal})

    def _renew(self, lease_id: UUID, body: dict[str, Any]) -> Answer:
        duration = float((body or {}).get("lease_duration", 300))
        if not 60 <= duration <= 86400:
            return Answer(422, {"detail": "invalid lease_duration"})
        lease = self.leases.get(lease_id)
        if lease is None:
            return Answer(410, {"detail": "Lease not found - it may have expired or been revoked"})
        lease.expires_at = self.clock() + duration
        return Answer(204)

    def _decrement_with_lease(self, body: dict[str, Any]) -> Answer:
        lease = self.leases.pop(UUID(body["lease_id"]), None)
        if lease is not None:
            self._decrement_ids(lease.limit_ids, lease.slots)
            self.ended[lease.id] = Ended(LeaseFate.RELEASED, self.clock(), lease)
        return Answer(204)

    def _decrement(self, body: dict[str, Any]) -> Answer:
        limits = [self.limits[n] for n in body.get("names") or [] if n in self.limits]
        self._decrement_ids(tuple(x.id for x in limits), int(body.get("slots", 0)))
        return Answer(200, [{"id": str(x.id), "name": x.name, "limit": x.limit} for x in limits])

    def _decrement_ids(self, ids: tuple[UUID, ...], slots: int) -> None:
        for limit in self.limits.values():
            if limit.id in ids and limit.active:
                limit.active_slots = max(0, limit.active_slots - slots)


class Fault(enum.Enum):
    """What happens to one request on its way to the model and back."""

    NONE = "none"
    REFUSED = "refused"  # connection refused: nothing sent
    ERROR_BEFORE = "error before"  # 503 before the handler ran: nothing applied
    ERROR_AFTER = "error after"  # 500 after the handler committed: applied
    LOST_ANSWER = "lost answer"  # applied, and the answer never came: the client times out


@dataclass(frozen=True)
class FaultRates:
    """Per-request probabilities of each fault (the rest get through)."""

    refused: float = 0.0
    error_before: float = 0.0
    error_after: float = 0.0
    lost_answer: float = 0.0
    slow: float = 0.0  # an answer that takes seconds instead of milliseconds

    def draw(self, rng: random.Random) -> Fault:
        x = rng.random()
        for fault, p in (
            (Fault.REFUSED, self.refused),
            (Fault.ERROR_BEFORE, self.error_before),
            (Fault.ERROR_AFTER, self.error_after),
            (Fault.LOST_ANSWER, self.lost_answer),
        ):
            if x < p:
                return fault
            x -= p
        return Fault.NONE


@dataclass
class RequestRecord:
    at: float
    method: str
    path: str
    fault: Fault
    status: int | None
    lease_id: UUID | None = None  # the lease an increment created
    slow: bool = False  # answered in seconds, not milliseconds
    sent_at: float = 0.0  # ``at`` is when the server handled it, after any delay
    # What no client can tell apart, met by this request in flight (see
    # ModelTransport.crossing), or None.
    crossed: str | None = None

    @property
    def ambiguous(self) -> bool:
        """Applied, but the client cannot know it: an error after, or no answer."""
        return self.status is not None and self.fault in (Fault.ERROR_AFTER, Fault.LOST_ANSWER)


class ModelTransport(httpx.AsyncBaseTransport):
    """Prefect's client talks to :class:`PrefectModel` through this, with faults.

    Args:
        model: the server.
        rng: the simulation's random source (faults and latency).
        rates: fault probabilities; ``faults_on`` turns them off for the quiet end.
        answer_timeout_s: how long the client waits for a lost answer before its
            read timeout fires (Prefect's client: ``PREFECT_API_REQUEST_TIMEOUT``).
    """

    def __init__(
        self,
        model: PrefectModel,
        rng: random.Random,
        rates: FaultRates,
        answer_timeout_s: float = 60.0,
        observe: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.model = model
        self.observe = observe
        self.rng = rng
        self.rates = rates
        self.faults_on = True
        self.answer_timeout_s = answer_timeout_s
        self.log: list[RequestRecord] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        rng = self.rng
        sent_at = asyncio.get_running_loop().time()
        fault = self.rates.draw(rng) if self.faults_on else Fault.NONE
        slow = self.faults_on and rng.random() < self.rates.slow
        await asyncio.sleep(rng.uniform(1.0, SLOW_ANSWER_S) if slow else rng.uniform(0.001, 0.02))
        record = RequestRecord(
            asyncio.get_running_loop().time(), request.method, request.url.path, fault, None,
            slow=slow, sent_at=sent_at,
        )  # fmt: skip
        self.log.append(record)
        if not self.model.up or fault is Fault.REFUSED:
            record.fault = Fault.REFUSED
            self._observed(record)
            raise httpx.ConnectError("connection refused", request=request)
        if fault is Fault.ERROR_BEFORE:
            record.status = 503
            self._observed(record)
            return httpx.Response(503, json={"detail": "busy"}, request=request)
        body = json.loads(request.content) if request.content else None
        record.crossed = self.crossing(record, body)
        answer = self.model.handle(request.method, request.url.path, body)
        record.status = answer.status
        if isinstance(answer.body, dict) and "lease_id" in answer.body:
            record.lease_id = UUID(answer.body["lease_id"])
        self._observed(record)
        if fault is Fault.ERROR_AFTER:
            return httpx.Response(500, json={"detail": "Internal Server Error"}, request=request)
        if fault is Fault.LOST_ANSWER:
            # The client's read timeout fires (the broker sets its own).
            timeouts = request.extensions.get("timeout") or {}
            await asyncio.sleep(timeouts.get("read") or self.answer_timeout_s)
            raise httpx.ReadTimeout("no answer", request=request)
        if answer.body is None:
            return httpx.Response(answer.status, headers=answer.headers, request=request)
        return httpx.Response(
            answer.status, json=answer.body, headers=answer.headers, request=request
        )

    def crossing(self, record: RequestRecord, body: Any) -> str | None:
        """What this request, delayed in flight, meets that no client can tell apart
        from the ordinary: a lease release after a restart forgot the lease (a 204
        either way; Prefect counts its slots for good), or a decrement by name after
        the limit was deleted and created again (it lowers the new limit's count)."""
        model = self.model
        if record.path == f"{BASE}/decrement-with-lease" and body:
            ended = model.ended.get(UUID(body["lease_id"]))
            if (
                ended is not None
                and ended.fate is LeaseFate.FORGOTTEN
                and ended.at > record.sent_at
                and model.counts_anything(ended.lease)
            ):
                return "a release that crossed a restart"  # fmt: skip
        if record.path == f"{BASE}/decrement" and any(
            record.sent_at < at <= record.at for at in model.recreated_at
        ):
            return "a decrement by name that crossed a recreate"
        return None

    def _observed(self, record: RequestRecord) -> None:
        if self.observe is not None:
            self.observe(record)


def seeded_ids(rng: random.Random) -> Callable[[], UUID]:
    """UUIDs from ``rng``: a replay hands out the same ids."""
    return lambda: uuid.UUID(int=rng.getrandbits(128), version=4)
