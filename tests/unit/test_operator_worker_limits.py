"""GpuWorkerLimit objects: the ledger as one object per pod, and the writes that keep them."""

from __future__ import annotations

from dataclasses import replace

from pgw_operator.handlers import DEPLOYMENT_PASS_EVERY_S, RESYNC_S, PassClock, PoolSeen
from pgw_operator.plan import plan_limits, settle
from pgw_operator.reconcile import PassScope, PoolState
from pgw_operator.registry import PendingWork
from pgw_operator.worker_limits import (
    LIMITS_FINALIZER,
    LimitRecord,
    WorkerLimitRecord,
    ledger_of,
    limit_manifest,
    record_writes,
    records_of,
)

from builders import NODES, entry, memory_entry, pod, pool_spec, prefect_limit


def test_an_object_round_trips_its_entries() -> None:
    ledger = {e.limit_name: e for e in (entry("a", size=2), memory_entry("a", size=160))}
    (record,) = records_of("pool", ledger).values()
    read = WorkerLimitRecord.from_object(limit_manifest(record, "ns", "uid-a"))
    # The state is the operator's memory, not written: read back, it is Creating
    # until a full pass has seen Prefect.
    assert read == replace(record, state="Creating")
    assert ledger_of([read]) == {n: replace(e, state="Creating") for n, e in ledger.items()}


def test_the_manifest_is_owned_by_its_pod_and_held_by_the_finalizer() -> None:
    record = WorkerLimitRecord("pool", "w-0", "n", 0, (LimitRecord("slots", "gpu:w-0", 1, "1"),))
    meta = limit_manifest(record, "ns", "uid-0")["metadata"]
    assert meta["name"] == "w-0"
    assert meta["finalizers"] == [LIMITS_FINALIZER]
    assert meta["labels"]["gpuworkers.dev/pool"] == "pool"
    (owner,) = meta["ownerReferences"]
    # The garbage collector deletes it with its pod; the pod's deletion waits for nothing.
    assert (owner["kind"], owner["uid"], owner["blockOwnerDeletion"]) == ("Pod", "uid-0", False)
    # A pod gone before its object was written (an old ledger's entry): nobody owns it.
    assert limit_manifest(record, "ns", "")["metadata"]["ownerReferences"] == []


def test_an_object_being_deleted_says_so() -> None:
    record = WorkerLimitRecord("pool", "w-0", "n", 0, (LimitRecord("slots", "gpu:w-0", 1, "1"),))
    assert not WorkerLimitRecord.from_object(limit_manifest(record, "ns", "u")).deleting
    deleting = limit_manifest(record, "ns", "u")
    deleting["metadata"]["deletionTimestamp"] = "2026-12-06T00:00:00Z"
    assert WorkerLimitRecord.from_object(deleting).deleting


def test_a_new_pod_costs_one_write_ahead_and_none_after() -> None:
    spec = pool_spec()
    plan = plan_limits(spec, {}, {"a": pod("a")}, NODES, {})
    ahead = record_writes({}, records_of("pool", plan.ledger), {"a"})
    assert [(w.kind, w.pod) for w in ahead] == [("create", "a")]
    assert ahead[0].record is not None
    written = {"a": ahead[0].record}
    after = record_writes(written, records_of("pool", settle(plan, plan.actions)), {"a"})
    assert after == []


def test_only_the_pods_in_scope_are_written() -> None:
    ledger = {e.limit_name: e for e in (entry("a"), entry("b"))}
    written = records_of("pool", ledger)
    wanted = records_of("pool", {"gpu:a": entry("a")})  # b's pod went
    assert [(w.kind, w.pod) for w in record_writes(written, wanted, {"a"})] == []
    assert [(w.kind, w.pod) for w in record_writes(written, wanted, {"a", "b"})] == [
        ("release", "b")
    ]


def test_an_object_stays_until_its_limit_is_deleted() -> None:
    """A pod gone: its entry is Deleting until Prefect deleted the limit; a failed
    delete keeps the object (a crash must still find the limit), a done one releases it."""
    spec = pool_spec()
    ledger = {"gpu:a": entry("a")}
    written = records_of("pool", ledger)
    plan = plan_limits(spec, ledger, {}, NODES, {"gpu:a": prefect_limit("a")})
    assert [a.kind for a in plan.actions] == ["delete"]
    failed = records_of("pool", settle(plan, []))
    assert record_writes(written, failed, {"a"}) == []
    assert failed["a"].state == "Deleting"
    done = records_of("pool", settle(plan, plan.actions))
    assert [w.kind for w in record_writes(written, done, {"a"})] == ["release"]


def test_a_restart_rewrites_the_spec_ahead_of_the_recreate() -> None:
    spec = pool_spec()
    ledger = {"gpu:a": entry("a")}
    written = records_of("pool", ledger)
    plan = plan_limits(
        spec, ledger, {"a": pod("a", restarts=1)}, NODES, {"gpu:a": prefect_limit("a")}
    )
    assert [a.kind for a in plan.actions] == ["recreate"]
    ahead = record_writes(written, records_of("pool", plan.ledger), {"a"})
    assert [w.kind for w in ahead] == ["spec"]
    assert ahead[0].record is not None
    assert ahead[0].record.restarts == 1


def test_state_at_start_takes_the_objects_and_what_only_an_old_ledger_holds() -> None:
    objects = records_of("pool", {"gpu:a": entry("a")})
    old_ledger = {"workers": [e.to_status() for e in (entry("a", size=9), entry("b"))]}
    state = PoolState.from_objects(objects, old_ledger)
    assert state.legacy_ledger
    assert state.ledger["gpu:a"].size == 1  # the object wins over the old ledger
    assert set(state.ledger) == {"gpu:a", "gpu:b"}
    assert not PoolState.from_objects(objects, {}).legacy_ledger


def seen_as(spec: str = "{}", replicas: int = 1, **annotations: str) -> PoolSeen:
    return PoolSeen(spec, frozenset(annotations.items()), replicas)


def test_the_pass_clock_scopes_each_pass_to_what_changed() -> None:
    clock = PassClock()
    seen = seen_as()
    nothing = PendingWork()
    assert clock.scope(0.0, seen, nothing) == PassScope.everything()  # the first pass
    clock.passed(PassScope.everything(), 0.0, seen, None)
    assert clock.scope(1.0, seen, nothing) is None
    # A pod's change: that pod only, no Deployment work.
    assert clock.scope(1.0, seen, PendingWork(pods={"a"})) == PassScope(False, frozenset({"a"}))
    # The Deployment's changes: at most every DEPLOYMENT_PASS_EVERY_S.
    busy = PendingWork(deployment=True)
    assert clock.scope(DEPLOYMENT_PASS_EVERY_S - 0.5, seen, busy) is None
    assert clock.wait_s(DEPLOYMENT_PASS_EVERY_S - 0.5, busy) == 0.5
    assert clock.scope(DEPLOYMENT_PASS_EVERY_S, seen, busy) == PassScope(True, frozenset())
    # A scale: the Deployment's pass, not every limit read back.
    assert clock.scope(3.0, seen_as(replicas=5), nothing) == PassScope(True, frozenset())
    clock.passed(PassScope(True, frozenset()), 3.0, seen_as(replicas=5), None)
    assert clock.scope(3.5, seen_as(replicas=5), nothing) is None
    # A spec change, an annotation, or the resync: everything.
    assert clock.scope(4.0, seen_as('{"gpu": 2}', 5), nothing) == PassScope.everything()
    assert clock.scope(4.0, seen_as(replicas=5, note="x"), nothing) == PassScope.everything()
    assert clock.scope(RESYNC_S, seen_as(replicas=5), nothing) == PassScope.everything()


def test_autoscaling_asks_for_pool_passes_between_resyncs() -> None:
    clock = PassClock()
    seen = seen_as()
    clock.passed(PassScope.everything(), 0.0, seen, 5.0)
    assert clock.wait_s(0.0, PendingWork()) == 5.0
    assert clock.scope(5.0, seen, PendingWork()) == PassScope(True, frozenset())
    clock.passed(PassScope(True, frozenset()), 5.0, seen, None)
    assert clock.wait_s(5.0, PendingWork()) == RESYNC_S - 5.0


def test_trusted_view_never_hides_a_pending_entry() -> None:
    from pgw_operator.reconcile import _trusted_limits

    ledger = {e.limit_name: e for e in (entry("a"), replace(entry("b"), state="Creating"))}
    assert set(_trusted_limits(ledger)) == {"gpu:a"}
