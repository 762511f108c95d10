"""Run the real slot broker through one schedule on virtual time and check its promises.

The broker under test is ``prefect_gpu_workers.slots.broker.SlotBroker`` itself, with
Prefect's real client; only the server behind the client is a model
(:mod:`.prefect_model`) and only the steps' connections are in memory
(:mod:`.pipes`). Invariants, checked whenever their inputs change:

- **within the limit** (I1): the slots of the steps that run never exceed the
  limit, except for the moments after a shrink the broker cannot know of yet
  (its next limit read) and the holders that were running when it came;
- **counted** (I2): the slots of the steps that run are all counted by Prefect
  (a step running uncounted is how a limit gets exceeded: Prefect admits
  someone else beside it);
- **no repossession**: no lease the broker knows expires (outages are shorter
  than a quarter of a lease, so only a missed renewal could); a lease it cannot
  know (its increment's answer was lost) is repossessed within
  ``FIRST_LEASE_S`` and the repossessor's period;
- **no leak** (I3): once every step has ended and the faults stop, Prefect counts
  only orphan leases after :data:`BROKER_SETTLES_S` (the broker gave back all it
  knows), and nothing, with no lease, once the repossessor had its turn; the
  broker holds nothing and retries nothing;
  except where a restart forgot a lease whose increment's answer was lost:
  Prefect then counts its slots for good, and no client can tell them from
  someone else's (its API lists no leases). Such schedules are counted apart
  (:attr:`Report.prefect_forgot_orphan`) and skip this check and **progress**;
  so are those where a request delayed in flight met what no client can tell
  apart (:attr:`Report.crossed`): a lease release applied after a restart
  forgot the lease (a 204 either way: counted for good), or a decrement by
  name applied after the limit was recreated (the new one counts too few;
  these skip **counted** too);
- **progress**: every step ends (granted and released, refused, or gave up)
  before a deadline far past the schedule's work;
- **no crash**: the broker logs no error and leaves no unretrieved exception.

With placement (``draw_schedule(seed, placement=True)``) steps also ask for GPU
memory and some for a licence seat; the broker holds a lease of the memory
limit and of the licence beside the slot's, and **within the GPU** (at every
grant, the memory of the steps running on a GPU fits it) and **within the
licence** (no more steps hold a seat than it has) join the invariants, while
**counted**, **no repossession** and **no leak** cover every limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import logging
import random
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast
from uuid import UUID

from prefect.context import SettingsContext, get_settings_context
from prefect.settings import (
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_API_URL,
    PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
    Settings,
    get_current_settings,
)

from prefect_gpu_workers.slots.broker import SlotBroker
from prefect_gpu_workers.slots.grants import WorkerGpu
from prefect_gpu_workers.slots.prefect_io import FIRST_LEASE_S
from prefect_gpu_workers.slots.wire import decode, encode

from . import loop as virtual
from .pipes import MemoryWriter, connection
from .prefect_model import (
    SLOW_ANSWER_S,
    Fault,
    LeaseFate,
    ModelTransport,
    PrefectModel,
    RequestRecord,
    seeded_ids,
)
from .schedule import Ending, EventKind, Schedule, StepPlan

WORKER = "sim-worker"
LIMIT = f"gpu:{WORKER}"
MEMORY_LIMIT = f"gpu-memory:{WORKER}"
LICENCE = "licence:sim"
REPOSSESSOR_EVERY_S = 5.0  # Prefect's repossessor loop (server.services.repossessor)
MAINTENANCE_S = 2.0  # the broker's default upkeep tick
REQUEST_TIMEOUT_S = 10.0  # the broker's default bound on one Prefect answer
# A recreated limit counts nobody until the broker re-counts its holders: its
# next limit read, then a tick per try (an answer timed out, a 503's back-off).
RECOUNT_GRACE_S = 60.0
# Once quiet, the broker has given back what it holds within this: a request
# sent just before (its fault drawn then) is slow and its answer lost, and the
# retry after it lands (after Prefect's client's jittered pause for a 5xx).
BROKER_SETTLES_S = SLOW_ANSWER_S + REQUEST_TIMEOUT_S + 5.0


class StepState(enum.Enum):
    PENDING = "pending"  # not arrived yet
    WAITING = "waiting"  # asked, not granted
    RUNNING = "running"  # granted: runs on the GPU
    RELEASED = "released"  # finished and asked for the release
    CRASHED = "crashed"  # died holding its slot
    GAVE_UP = "gave up"  # left before its grant
    REFUSED = "refused"  # the broker answered with an error
    CUT_OFF = "cut off"  # the broker closed the connection (the step would poll Prefect)


ENDED = {StepState.RELEASED, StepState.CRASHED, StepState.GAVE_UP, StepState.REFUSED,
         StepState.CUT_OFF}  # fmt: skip


@dataclass
class StepRun:
    plan: StepPlan
    state: StepState = StepState.PENDING
    lease_id: UUID | None = None  # the slot's
    lease_ids: tuple[UUID, ...] = ()  # every lease of its grant (slot, memory, licence)
    gpu: int | None = None  # the GPU it was placed on
    excused: bool = False  # its lease was repossessed: already reported, not again

    def holds(self, limit: str) -> int:
        """What it holds of ``limit`` while it runs."""
        if limit == LIMIT:
            return self.plan.occupy
        if limit == MEMORY_LIMIT:
            return self.plan.memory_gib or 0
        return int(self.plan.licence) if limit == LICENCE else 0


@dataclass(frozen=True)
class Violation:
    at: float
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"t={self.at:.3f} {self.invariant}: {self.detail}"


@dataclass
class Report:
    schedule: Schedule
    violations: list[Violation] = field(default_factory=list)
    requests: int = 0
    faults: int = 0
    grants: int = 0
    leases_passed: int = 0
    virtual_s: float = 0.0
    orphans: int = 0  # leases made by increments whose answer was lost
    fault_kinds: dict[str, int] = field(default_factory=dict)
    prefect_forgot_orphan: bool = False
    crossed: str | None = None  # RequestRecord.crossed: the first one met
    trace: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def digest(self) -> str:
        """A hash of everything that happened: equal digests, equal runs."""
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()[:16]


# The slot authority's loggers (broker, give-backs) all log below this one.
SLOTS_LOGGER = "prefect_gpu_workers.slots"


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Simulation:
    """One schedule's run; ``broker_options`` override the broker's defaults
    (the tests' mutants: a defect put back on purpose)."""

    def __init__(self, schedule: Schedule, **broker_options: Any) -> None:
        self.schedule = schedule
        self.broker_options = broker_options
        self.rng = random.Random(schedule.seed ^ 0x5EED)
        self.report = Report(schedule)
        self.steps = [StepRun(plan) for plan in schedule.steps]
        self.model: PrefectModel | None = None
        self.broker: SlotBroker | None = None
        self._seen: set[str] = set()
        self.orphans: dict[UUID, float] = {}  # lease id -> when its increment landed
        self.recount_owed_since: float | None = None
        self.shrunk_at = float("-inf")
        self.down: list[tuple[float, float]] = []  # when the server was down

    # -- invariants -------------------------------------------------------------
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def violate(self, invariant: str, detail: str) -> None:
        if invariant in self._seen:
            return  # the first of each kind says enough; later ones are its echoes
        self._seen.add(invariant)
        self.report.violations.append(Violation(self.now(), invariant, detail))

    def note(self, what: str) -> None:
        self.report.trace.append(f"{self.now():.6f} {what}")

    def check_counted(self) -> None:
        """I2. One shortfall is the broker's to mend, not a violation at once: steps
        on a lease of a limit since deleted (recreated under its name) count
        nothing until the broker re-counts them, which it can only do once
        Prefect has room for them; it must within :data:`RECOUNT_GRACE_S` of that."""
        assert self.model is not None
        if self.report.crossed is not None:
            return  # a decrement crossed a recreate: the new limit counts too few for good
        running = [s for s in self.steps if s.state is StepState.RUNNING and not s.excused]
        for companion in self.limits[1:]:  # never resized or recreated: counted at once
            held, counted = sum(s.holds(companion) for s in running), self.model.counted(companion)
            if held > counted:
                self.violate("counted", f"{held} of {companion} held, Prefect counts {counted}")
        slots = sum(s.plan.occupy for s in running)
        counted = self.model.counted(LIMIT)
        shortfall = slots - counted
        stale = sum(s.plan.occupy for s in running if self.on_deleted_limit(s))
        if shortfall <= 0 or (shortfall <= stale and slots > self.model.limits[LIMIT].limit):
            self.recount_owed_since = None  # all counted, or no room to re-count in
            return
        if shortfall <= stale:
            if self.recount_owed_since is None:
                self.recount_owed_since = self.now()
            if self.now() - self.recount_owed_since < RECOUNT_GRACE_S:
                return
        self.violate(
            "counted",
            f"{slots} slot(s) run ({', '.join(s.plan.name for s in running)}) "
            f"but Prefect counts {counted}",
        )

    def on_deleted_limit(self, step: StepRun) -> bool:
        """Whether ``step`` was granted a lease of a limit that no longer exists."""
        assert self.model is not None
        if step.lease_id is None:
            return False
        lease = self.model.leases.get(step.lease_id)
        if lease is None and (ended := self.model.ended.get(step.lease_id)) is not None:
            lease = ended.lease
        return lease is not None and not self.model.counts_anything(lease)

    def check_within_limit(self, granted: StepRun) -> None:
        """At a grant: the running steps fit the limit (see the module docstring),
        each GPU and the licence."""
        assert self.model is not None
        self.check_within_gpus(granted)
        if self.now() - self.shrunk_at < RECOUNT_GRACE_S:
            return
        running = sum(s.plan.occupy for s in self.steps if s.state is StepState.RUNNING)
        limit = self.model.limits[LIMIT].limit
        if running > limit:
            self.violate(
                "within the limit",
                f"{granted.plan.name} granted: {running} slot(s) run, the limit is {limit}",
            )

    def check_within_gpus(self, granted: StepRun) -> None:
        placement = self.schedule.placement
        if placement is None:
            return
        running = [s for s in self.steps if s.state is StepState.RUNNING]
        for position, size in enumerate(placement.gpus):
            placed = sum(s.plan.memory_gib or 0 for s in running if s.gpu == position)
            if placed > size:
                self.violate(
                    "within the GPU",
                    f"{granted.plan.name} granted: {placed} GiB on GPU {position} of {size} GiB",
                )
        seats = sum(s.plan.licence for s in running)
        if seats > placement.licence_seats:
            self.violate(
                "within the licence",
                f"{granted.plan.name} granted: {seats} hold the licence's "
                f"{placement.licence_seats} seat(s)",
            )

    @property
    def limits(self) -> list[str]:
        """The limits of this schedule, the slot limit first."""
        if self.schedule.placement is None:
            return [LIMIT]
        return [LIMIT, MEMORY_LIMIT] + ([LICENCE] if self.schedule.placement.licence_seats else [])

    def check_repossessed(self, lease_ids: list[UUID]) -> None:
        assert self.model is not None
        bound = FIRST_LEASE_S + REPOSSESSOR_EVERY_S + 1.0
        for lease_id in lease_ids:
            if not self.model.counts_anything(self.model.ended[lease_id].lease):
                continue  # its limit was deleted: it counted nothing any more
            if lease_id in self.orphans:
                created, ended = self.orphans[lease_id], self.model.ended[lease_id].at
                held = ended - created
                # The repossessor does not run while the server is down, and the
                # pass an outage skipped comes a period later (file lease storage:
                # a restart keeps the orphan).
                down = self.downtime(created, ended)
                if held > bound + down + (REPOSSESSOR_EVERY_S if down else 0.0):
                    self.violate("no repossession", f"orphan lease {lease_id} held {held:.0f} s")
                continue
            holders = [
                s for s in self.steps if lease_id in s.lease_ids and s.state is StepState.RUNNING
            ]
            for step in holders:
                step.excused = True
            self.violate(
                "no repossession",
                f"lease {lease_id} expired and was repossessed "
                + (f"while {holders[0].plan.name} ran" if holders else "(held by no running step)"),
            )

    def downtime(self, start: float, end: float) -> float:
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in self.down)

    def beyond_clients(self) -> bool:
        """Whether something no client can tell apart happened (module docstring)."""
        return self.forgot_orphans() or self.report.crossed is not None

    def forgot_orphans(self) -> bool:
        """Whether a restart forgot a lease nobody could know (see the module docstring)."""
        assert self.model is not None
        return any(
            (ended := self.model.ended.get(lease_id)) is not None
            and ended.fate is LeaseFate.FORGOTTEN
            and self.model.counts_anything(ended.lease)
            for lease_id in self.orphans
        )

    # -- actors -------------------------------------------------------------------
    async def step(self, run: StepRun) -> None:
        plan = run.plan
        await asyncio.sleep(plan.arrives_at)
        reader, writer, serving = connect(self.broker_started())
        try:
            await self._step_on(run, reader, writer, serving)
        except asyncio.CancelledError:
            # Past the deadline (a forgotten orphan holds Prefect's count): the
            # step dies as its process would, and the broker must let go of it.
            if run.state not in ENDED:
                run.state = (
                    StepState.CRASHED if run.state is StepState.RUNNING else StepState.GAVE_UP
                )
            writer.close()
            raise

    def broker_started(self) -> SlotBroker:
        assert self.broker is not None
        return self.broker

    async def _step_on(
        self,
        run: StepRun,
        reader: asyncio.StreamReader,
        writer: MemoryWriter,
        serving: asyncio.Task[None],
    ) -> None:
        plan = run.plan
        run.state = StepState.WAITING
        self.note(f"{plan.name} asks for {plan.occupy}")
        request: dict[str, Any] = {"op": "acquire", "limit": LIMIT, "occupy": plan.occupy}
        if plan.memory_gib is not None:
            request["memory_gib"] = plan.memory_gib
        if plan.licence:
            request["also"] = {LICENCE: 1}
        writer.write(encode(request))
        try:
            patience = plan.patience_s if plan.ending is Ending.GIVE_UP else None
            async with asyncio.timeout(patience):
                line = await reader.readline()
        except TimeoutError:
            run.state = StepState.GAVE_UP
            self.note(f"{plan.name} gives up")
            writer.close()
            await serving
            return
        if not line:
            run.state = StepState.CUT_OFF
            self.note(f"{plan.name} cut off")
            writer.close()
            await serving
            return
        message = decode(line)
        if message.get("event") != "granted":
            run.state = StepState.REFUSED
            self.note(f"{plan.name} refused: {message.get('message')}")
            writer.close()
            await serving
            return
        run.state, run.lease_id = StepState.RUNNING, UUID(message["lease_id"])
        run.lease_ids = tuple(UUID(lease) for lease in message.get("lease_ids") or [run.lease_id])
        run.gpu = (message.get("gpu") or {}).get("position")
        self.note(
            f"{plan.name} runs on lease {run.lease_id}"
            + (f", GPU {run.gpu}" if run.gpu is not None else "")
        )
        self.check_counted()
        self.check_within_limit(run)
        await asyncio.sleep(plan.hold_s)
        if plan.ending is Ending.CRASH:
            run.state = StepState.CRASHED
            self.note(f"{plan.name} crashes")
            writer.close()
            await serving
            return
        run.state = StepState.RELEASED
        self.note(f"{plan.name} releases")
        writer.write(encode({"op": "release"}))
        answer = await reader.readline()
        writer.close()
        await serving
        if not answer:
            self.violate("release answered", f"{plan.name}'s release got no answer")

    async def server_events(self) -> None:
        model = self.model
        assert model is not None
        start = self.now()
        for event in self.schedule.events:
            await asyncio.sleep(max(0.0, start + event.at - self.now()))
            self.note(f"server {event.kind.value} {event.value:g}")
            if event.kind is EventKind.RESIZE:
                if int(event.value) < model.limits[LIMIT].limit:
                    self.shrunk_at = self.now()
                model.resize(LIMIT, int(event.value))
                continue
            if event.kind is EventKind.RECREATE:
                model.recreate_limit(LIMIT)
                continue
            model.up = False
            if event.kind is EventKind.RESTART:
                model.restart()
            await asyncio.sleep(event.value)
            model.up = True
            self.down.append((self.now() - event.value, self.now()))
            self.note("server up")

    async def repossessor(self) -> None:
        model = self.model
        assert model is not None
        while True:
            await asyncio.sleep(REPOSSESSOR_EVERY_S)
            if model.up:
                expired = model.repossess()
                if expired:
                    self.note(f"repossessed {len(expired)}")
                    self.check_repossessed([lease.id for lease in expired])
                    self.check_counted()

    # -- the run --------------------------------------------------------------------
    async def run(self) -> Report:
        loop = asyncio.get_running_loop()
        schedule = self.schedule
        model = self.model = PrefectModel(loop.time, seeded_ids(self.rng), schedule.lease_storage)
        model.create_limit(LIMIT, schedule.capacity)
        placement = schedule.placement
        if placement is not None:
            model.create_limit(MEMORY_LIMIT, sum(placement.gpus))
            if placement.licence_seats:
                model.create_limit(LICENCE, placement.licence_seats)

        def observe(record: RequestRecord) -> None:
            if record.ambiguous and record.lease_id is not None:
                self.orphans[record.lease_id] = record.at
            if record.crossed is not None and self.report.crossed is None:
                self.report.crossed = record.crossed
                self.note(f"crossed: {record.crossed}")
            fault = "" if record.fault is Fault.NONE else f" [{record.fault.value}]"
            self.note(f"{record.method} {record.path.rsplit('/', 1)[-1]}{fault} -> {record.status}")
            self.check_counted()

        transport = ModelTransport(model, self.rng, schedule.faults, observe=observe)
        errors = _ErrorLog()
        broker_log = logging.getLogger(SLOTS_LOGGER)
        broker_log.addHandler(errors)
        options: dict[str, Any] = {"lease_duration": schedule.lease_duration}
        if placement is not None:
            options["gpus"] = tuple(WorkerGpu(i, "", gib) for i, gib in enumerate(placement.gpus))
        options.update(self.broker_options)
        try:
            async with broker_on_model(transport, **options) as self.broker:
                background = [
                    asyncio.ensure_future(self.server_events()),
                    asyncio.ensure_future(self.repossessor()),
                ]
                steps = asyncio.ensure_future(
                    asyncio.gather(*(self.step(run) for run in self.steps))
                )
                deadline = await self.progress_deadline(steps)
                if deadline is not None:
                    stuck = [f"{s.plan.name} ({s.state.value})" for s in self.steps
                             if s.state not in ENDED]  # fmt: skip
                    steps.cancel()
                    await asyncio.gather(steps, return_exceptions=True)
                    if not self.beyond_clients():
                        self.violate(
                            "progress", f"not ended {deadline:.0f} s in: {', '.join(stuck)}"
                        )
                # The quiet end: no more faults or events; what is still owed is paid.
                background[0].cancel()
                model.up = True
                transport.faults_on = False
                # What the broker owes it pays at once: an answer it waits for
                # times out, a retry follows ...
                await asyncio.sleep(BROKER_SETTLES_S)
                self.check_settled()
                # ... and the repossessor takes the orphan leases.
                await asyncio.sleep(FIRST_LEASE_S + 2 * REPOSSESSOR_EVERY_S - BROKER_SETTLES_S)
                self.check_quiet()
                background[1].cancel()
                await asyncio.gather(*background, return_exceptions=True)
        finally:
            broker_log.removeHandler(errors)
        for record in errors.records:
            trace = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
            self.violate("no crash", f"broker logged: {record.getMessage()}\n{trace}")
        for context in loop.unhandled if isinstance(loop, virtual.VirtualTimeLoop) else []:
            self.violate(
                "no crash", f"unretrieved: {context.get('message')} {context.get('exception')!r}"
            )
        self.report.requests = len(transport.log)
        self.report.faults = sum(1 for r in transport.log if r.fault is not Fault.NONE)
        kinds: dict[str, int] = {}
        for request in transport.log:
            if request.fault is not Fault.NONE:
                kinds[request.fault.value] = kinds.get(request.fault.value, 0) + 1
            if request.slow:
                kinds["slow answer"] = kinds.get("slow answer", 0) + 1
        self.report.fault_kinds = kinds
        self.report.grants = self.broker.stats.grants
        self.report.leases_passed = self.broker.stats.leases_passed
        self.report.virtual_s = self.now() - 1000.0
        self.report.orphans = len(self.orphans)
        self.report.prefect_forgot_orphan = self.forgot_orphans()
        return self.report

    async def progress_deadline(self, steps: asyncio.Future[Any]) -> float | None:
        """Wait for ``steps``; the deadline passed (seconds after the start), or None.

        The deadline is far past the schedule's work, plus, for each orphan lease
        (an increment whose answer was lost), the time Prefect holds its slots
        (a first lease and a repossessor pass): no client can give them back
        sooner, and a limit of one seat waits that long for each.
        """
        start = self.now()
        while not steps.done():
            extra = len(self.orphans) * (FIRST_LEASE_S + 2 * REPOSSESSOR_EVERY_S)
            deadline = self.schedule.busy_until + 600.0 + extra
            left = start + deadline - self.now()
            if left <= 0:
                return deadline
            await asyncio.wait({steps}, timeout=left)
        return None

    def check_settled(self) -> None:
        """Quiet for :data:`BROKER_SETTLES_S`: Prefect counts only the orphan leases
        (which only the repossessor can take back)."""
        model = self.model
        assert model is not None
        if self.beyond_clients():
            return
        orphan_slots = sum(
            lease.slots
            for lease_id, lease in model.leases.items()
            if lease_id in self.orphans and model.counts_anything(lease)
        )
        counted = sum(model.counted(name) for name in self.limits)
        if counted != orphan_slots:
            self.violate(
                "no leak",
                f"{BROKER_SETTLES_S:g} s after the last step, Prefect counts {counted} slot(s), "
                f"{orphan_slots} of them orphans'",
            )

    def check_quiet(self) -> None:
        model, broker = self.model, self.broker
        assert model is not None
        assert broker is not None
        counted = sum(model.counted(name) for name in self.limits)
        if self.beyond_clients():
            counted = 0  # Prefect's for good; nobody can give it back (module docstring)
        if counted:
            self.violate(
                "no leak", f"Prefect still counts {counted} slot(s) after every step ended"
            )
        counting = [lease for lease in model.leases.values() if model.counts_anything(lease)]
        if counting:
            self.violate("no leak", f"Prefect still holds {len(counting)} lease(s)")
        described = broker.describe()
        if described["holders"] or described["give_backs_in_flight"]:
            self.violate("no leak", f"the broker still holds or retries: {described}")
        repossessed = [i for i, e in model.ended.items() if e.fate is LeaseFate.REPOSSESSED]
        if repossessed:
            self.check_repossessed(repossessed)


_NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@functools.cache
def _sim_settings() -> Settings:
    """Prefect's settings pointed at the model: built once (a copy validates every
    field, a tenth of a second, which thousands of schedules would pay each)."""
    return get_current_settings().copy_with_update(
        updates={
            PREFECT_API_URL: "http://prefect.sim/api",
            PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: False,
            PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True,
        }
    )


@contextlib.asynccontextmanager
async def broker_on_model(transport: ModelTransport, **options: Any) -> AsyncIterator[SlotBroker]:
    """A started :class:`SlotBroker` of :data:`WORKER` whose Prefect is ``transport``'s
    model; no socket (connect with :func:`connect`). For the simulation, and for
    unit tests of the broker on the virtual clock."""
    with SettingsContext(profile=get_settings_context().profile, settings=_sim_settings()):
        broker = SlotBroker(
            WORKER,
            **{"maintenance_s": MAINTENANCE_S, **options},
            clock=asyncio.get_running_loop().time,
            # An SSLContext of its own spares the client loading the CA bundle
            # for each broker (30 ms each; the model is in memory, no TLS).
            httpx_settings={"transport": transport, "verify": _NO_TLS},
        )
        await broker.start(listen=False)
        try:
            yield broker
        finally:
            await broker.close()


def connect(broker: SlotBroker) -> tuple[asyncio.StreamReader, MemoryWriter, asyncio.Task[None]]:
    """A step's end of a new in-memory connection, and the task serving the other."""
    (reader, writer), (server_reader, server_writer) = connection()
    serving = asyncio.ensure_future(
        broker.serve_connection(server_reader, cast(asyncio.StreamWriter, server_writer))
    )
    return reader, writer, serving


def simulate(schedule: Schedule, **broker_options: Any) -> Report:
    """Run ``schedule`` on a fresh virtual-time loop.

    Prefect's client draws its retry jitter from the global ``random`` (it sleeps
    a jittered back-off after a 5xx even with retries off): seeded here for the
    run, and put back after, so that a seed replays exactly.
    """
    state = random.getstate()
    random.seed(schedule.seed)
    try:
        return virtual.run(Simulation(schedule, **broker_options).run())
    finally:
        random.setstate(state)


@contextlib.contextmanager
def quiet_broker_logs() -> Any:
    """The broker warns about every fault the simulation injects: not for the screen."""
    broker_log = logging.getLogger(SLOTS_LOGGER)
    level, propagate = broker_log.level, broker_log.propagate
    broker_log.setLevel(logging.WARNING)
    broker_log.propagate = False
    try:
        yield
    finally:
        broker_log.setLevel(level)
        broker_log.propagate = propagate
