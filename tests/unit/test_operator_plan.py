"""The limit plan and its write-ahead ledger (``pgw_operator.plan``)."""

from __future__ import annotations

from dataclasses import replace

from pgw_operator.plan import (
    LimitAction,
    deletion_costs,
    ledger_from_status,
    ledger_to_status,
    plan_limits,
    settle,
)

from builders import NODES, by_name, entry, make_spec, pod
from builders import prefect_limit as prefect


def test_new_bound_pods_get_limits_unbound_ones_wait() -> None:
    pods = {"a": pod("a"), "b": pod("b"), "c": pod("c", node=None)}
    plan = plan_limits(make_spec(), {}, pods, NODES, {})
    assert plan.actions == [
        LimitAction("create", "gpu:a", 1, "container limit nvidia.com/gpu=1"),
        LimitAction("create", "gpu:b", 1, "container limit nvidia.com/gpu=1"),
    ]
    # Write-ahead: the ledger names them before they exist.
    assert {e.state for e in plan.ledger.values()} == {"Creating"}
    assert set(settle(plan, plan.actions)) == {"gpu:a", "gpu:b"}
    assert {e.state for e in settle(plan, plan.actions).values()} == {"Ready"}


def test_gone_pods_lose_exactly_their_limits() -> None:
    ledger = {e.limit_name: e for e in (entry("a"), entry("b"), entry("c"))}
    plan = plan_limits(make_spec(), ledger, {"a": pod("a")}, NODES, by_name(*map(prefect, "abc")))
    assert sorted((a.kind, a.name) for a in plan.actions) == [
        ("delete", "gpu:b"),
        ("delete", "gpu:c"),
    ]
    assert plan.ledger["gpu:b"].state == "Deleting"
    assert set(settle(plan, plan.actions)) == {"gpu:a"}


def test_failed_delete_keeps_the_ledger_entry_for_a_retry() -> None:
    ledger = {"gpu:b": entry("b")}
    plan = plan_limits(make_spec(), ledger, {}, NODES, by_name(prefect("b")))
    assert settle(plan, [])["gpu:b"].state == "Deleting"


def test_evicted_pod_loses_its_limit_terminating_pod_keeps_it() -> None:
    ledger = {"gpu:a": entry("a"), "gpu:b": entry("b")}
    pods = {"a": pod("a", phase="Failed"), "b": pod("b", terminating=True)}
    plan = plan_limits(make_spec(), ledger, pods, NODES, by_name(prefect("a"), prefect("b")))
    assert [(a.kind, a.name) for a in plan.actions] == [("delete", "gpu:a")]


def test_limits_it_did_not_create_are_never_touched() -> None:
    # "gpu:manual" exists in Prefect and follows the naming, but is not in the ledger.
    plan = plan_limits(make_spec(), {}, {}, NODES, by_name(prefect("manual")))
    assert plan.actions == []
    assert plan.ledger == {}


def test_ledger_entry_whose_limit_was_not_read_is_deleted_all_the_same() -> None:
    """A paged read can miss a limit (pages shift as limits come and go) and a create
    without an answer can land late: a gone pod's entry is deleted (a 404 is fine)
    and leaves the ledger only once the delete succeeded."""
    plan = plan_limits(make_spec(), {"gpu:b": entry("b")}, {}, NODES, {})
    assert [(a.kind, a.name) for a in plan.actions] == [("delete", "gpu:b")]
    assert plan.ledger["gpu:b"].state == "Deleting"
    assert settle(plan, []) == plan.ledger
    assert settle(plan, plan.actions) == {}


def test_restart_in_place_recreates_the_limit() -> None:
    ledger = {"gpu:a": entry("a", restarts=0)}
    pods = {"a": pod("a", restarts=1)}
    plan = plan_limits(make_spec(), ledger, pods, NODES, by_name(prefect("a", slots=1)))
    assert [(a.kind, a.name) for a in plan.actions] == [("recreate", "gpu:a")]
    settled = settle(plan, plan.actions)["gpu:a"]
    assert (settled.restarts, settled.active_slots, settled.state) == (1, 0, "Ready")
    # The same restart count does not recreate again.
    again = plan_limits(make_spec(), settle(plan, plan.actions), pods, NODES, by_name(prefect("a")))
    assert again.actions == []


def test_size_change_and_disabled_limit_are_corrected() -> None:
    ledger = {"gpu:a": entry("a", size=1), "gpu:b": entry("b", size=2)}
    pods = {"a": pod("a", gpus=2), "b": pod("b", gpus=2)}
    spec = make_spec(perWorker=2)
    limits = by_name(prefect("a", limit=1), prefect("b", limit=2, active=False))
    plan = plan_limits(spec, ledger, pods, NODES, limits)
    assert sorted((a.kind, a.name, a.size) for a in plan.actions) == [
        ("resize", "gpu:a", 2),
        ("resize", "gpu:b", 2),
    ]


def test_limit_deleted_behind_our_back_is_recreated() -> None:
    plan = plan_limits(make_spec(), {"gpu:a": entry("a")}, {"a": pod("a")}, NODES, {})
    assert [(a.kind, a.name) for a in plan.actions] == [("create", "gpu:a")]


def test_prefix_change_moves_every_limit() -> None:
    ledger = {"gpu:a": entry("a")}
    spec = make_spec(perWorker=1, limitPrefix="infer")
    plan = plan_limits(spec, ledger, {"a": pod("a")}, NODES, by_name(prefect("a")))
    assert sorted((a.kind, a.name) for a in plan.actions) == [
        ("create", "infer:a"),
        ("delete", "gpu:a"),
    ]


def test_scale_down_prefers_idle_workers() -> None:
    ledger = {
        "gpu:busy": replace(entry("busy", size=2), active_slots=2),
        "gpu:idle": entry("idle", size=2),
        "gpu:set": replace(entry("set", size=2), active_slots=1),
        "gpu:freed": entry("freed", size=2),
        "gpu:new": entry("new", state="Creating"),
        "gpu:leaving": replace(entry("leaving"), active_slots=1),
    }
    pods = {
        "busy": pod("busy"),
        "idle": pod("idle"),
        "set": pod("set", deletion_cost=1),
        "freed": pod("freed", deletion_cost=2),
        "new": pod("new"),
        "leaving": pod("leaving", terminating=True),
    }
    # Cost = slots held: the ReplicaSet deletes idle workers first. Only changes
    # are returned (no annotation is cost 0); pods without a Ready limit or on
    # their way out are left alone.
    assert deletion_costs(ledger, pods) == {"busy": 2, "freed": 0}


def test_ledger_round_trips_through_status() -> None:
    ledger = {"gpu:a": entry("a", size=3, restarts=2, state="Deleting")}
    assert ledger_from_status({"workers": ledger_to_status(ledger)}) == ledger
