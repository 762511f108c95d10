"""The operator's pure decisions: sizing, the limit plan, the desired Deployment, conditions."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pgw_operator.conditions import PoolHealth, merge_conditions, pool_conditions
from pgw_operator.desired import desired_deployment
from pgw_operator.facts import NodeFacts, PodFacts
from pgw_operator.plan import (
    LedgerEntry,
    LimitAction,
    PrefectLimit,
    deletion_costs,
    ledger_from_status,
    ledger_to_status,
    plan_limits,
    settle,
)
from pgw_operator.sizing import LimitSize, SizingProblem, size_limit
from pgw_operator.spec import POOL_LABEL, PoolSpec


def make_spec(**gpu: Any) -> PoolSpec:
    return PoolSpec.from_dict(
        {
            "replicas": 2,
            "workPool": {"name": "gpu-pool", "flowRunsPerWorker": 8},
            "prefect": {"apiUrl": "http://prefect:4200/api"},
            "gpu": gpu or {"perWorker": 1},
            "worker": {"image": "example/worker:1"},
        }
    )


def pod(name: str, node: str | None = "gpu-8", gpus: int | None = 1, **kw: Any) -> PodFacts:
    limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    base: dict[str, Any] = {"phase": "Running", "terminating": False, "ready": True, "restarts": 0}
    base.update(kw)
    return PodFacts(name=name, node=node, limits=limits, **base)


NODES = {
    "gpu-8": NodeFacts("gpu-8", {"nvidia.com/gpu": "8"}, {"nvidia.com/gpu.count": "8"}),
    "timesliced": NodeFacts(
        "timesliced", {"nvidia.com/gpu": "8"}, {"nvidia.com/gpu.replicas": "4"}
    ),
    "mig": NodeFacts("mig", {"nvidia.com/mig-1g.10gb": "7"}, {}),
    "cpu": NodeFacts("cpu", {"cpu": "8"}, {}),
}


# Sizing ----------------------------------------------------------------------


def test_container_limit_sizes_the_limit_times_slots_per_gpu() -> None:
    sized = size_limit(pod("w", gpus=2), NODES["gpu-8"], make_spec(perWorker=2, slotsPerGpu=2))
    assert sized == LimitSize(4, "2", "container limit nvidia.com/gpu=2")


def test_whole_node_uses_node_allocatable() -> None:
    spec = make_spec(wholeNode=True)
    sized = size_limit(pod("w", gpus=None), NODES["gpu-8"], spec)
    assert isinstance(sized, LimitSize)
    assert (sized.slots, sized.gpus) == (8, "8")


def test_time_sliced_node_counts_physical_gpus() -> None:
    whole = size_limit(
        pod("w", "timesliced", gpus=None), NODES["timesliced"], make_spec(wholeNode=True)
    )
    assert isinstance(whole, LimitSize)
    assert (whole.slots, whole.gpus) == (2, "2")
    assert "time-sliced x4" in whole.basis
    one_replica = size_limit(pod("w", "timesliced", gpus=1), NODES["timesliced"], make_spec())
    assert isinstance(one_replica, LimitSize)
    # A quarter of a GPU still gets one slot, never a whole GPU's worth of many.
    assert (one_replica.slots, one_replica.gpus) == (1, "0.25")
    shared = make_spec(perWorker=2, slotsPerGpu=4)
    two_replicas = size_limit(pod("w", "timesliced", gpus=2), NODES["timesliced"], shared)
    assert isinstance(two_replicas, LimitSize)
    assert (two_replicas.slots, two_replicas.gpus) == (2, "0.5")


def test_mig_slices_are_devices_not_gpus() -> None:
    spec = make_spec(resourceName="nvidia.com/mig-1g.10gb", wholeNode=True, slotsPerGpu=1)
    sized = size_limit(pod("w", "mig", gpus=None), NODES["mig"], spec)
    assert isinstance(sized, LimitSize)
    assert (sized.slots, sized.gpus) == (7, "7 mig-1g.10gb")


def test_no_gpu_is_a_problem_not_a_zero_limit() -> None:
    assert isinstance(size_limit(pod("w", gpus=None), NODES["gpu-8"], make_spec()), SizingProblem)
    problem = size_limit(pod("w", "cpu", gpus=None), NODES["cpu"], make_spec(wholeNode=True))
    assert isinstance(problem, SizingProblem)
    assert "no GPU" in problem.reason


# The limit plan --------------------------------------------------------------


def entry(name: str, size: int = 1, restarts: int = 0, state: str = "Ready") -> LedgerEntry:
    return LedgerEntry(f"gpu:{name}", name, "gpu-8", size, str(size), restarts, state)  # type: ignore[arg-type]


def prefect(name: str, limit: int = 1, active: bool = True, slots: int = 0) -> PrefectLimit:
    return PrefectLimit(f"gpu:{name}", limit, active, slots)


def by_name(*limits: PrefectLimit) -> dict[str, PrefectLimit]:
    return {limit.name: limit for limit in limits}


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


def test_ledger_entry_whose_limit_vanished_is_dropped_not_deleted() -> None:
    plan = plan_limits(make_spec(), {"gpu:b": entry("b")}, {}, NODES, {})
    assert plan.actions == []
    assert plan.ledger == {}


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


def test_pod_facts_read_the_deletion_cost() -> None:
    meta = {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "3"}}
    facts = PodFacts.from_pod("p", {"nodeName": "n"}, {"phase": "Running"}, meta)
    assert facts.deletion_cost == 3
    assert PodFacts.from_pod("p", {}, {}, {}).deletion_cost is None


def test_ledger_round_trips_through_status() -> None:
    ledger = {"gpu:a": entry("a", size=3, restarts=2, state="Deleting")}
    assert ledger_from_status({"workers": ledger_to_status(ledger)}) == ledger


# Desired Deployment ----------------------------------------------------------


def test_deployment_gives_each_pod_its_name_as_worker_id_and_the_gpu_limit() -> None:
    spec = make_spec(perWorker=2, limitPrefix="infer")
    deployment = desired_deployment("team-a", "ml", "uid-1", spec)
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert deployment["spec"]["replicas"] == 2
    pod_spec = deployment["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["command"][:2] == ["prefect-gpu-workers", "worker"]
    assert container["command"][container["command"].index("--limit-prefix") + 1] == "infer"
    assert container["command"][container["command"].index("--flow-runs") + 1] == "8"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels[POOL_LABEL] == "team-a"
    assert deployment["spec"]["selector"]["matchLabels"] == {POOL_LABEL: "team-a"}


def test_api_key_is_referenced_never_copied() -> None:
    spec = PoolSpec.from_dict(
        {
            "workPool": {"name": "p"},
            "prefect": {"apiUrl": "https://x/api", "apiKeySecretRef": {"name": "prefect-key"}},
            "gpu": {"perWorker": 1},
            "worker": {"image": "i"},
        }
    )
    env = desired_deployment("p", "ns", "u", spec)["spec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    key = next(e for e in env if e["name"] == "PREFECT_API_KEY")
    assert key == {
        "name": "PREFECT_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "prefect-key", "key": "api-key"}},
    }


def test_pod_template_overrides_merge_but_cannot_drop_the_gpu_limit() -> None:
    spec = PoolSpec.from_dict(
        {
            "workPool": {"name": "p"},
            "prefect": {"apiUrl": "http://x/api"},
            "gpu": {"perWorker": 1},
            "worker": {
                "image": "i",
                "podTemplate": {
                    "nodeSelector": {"pool": "a100"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                    "resources": {"limits": {"memory": "8Gi", "nvidia.com/gpu": "4"}},
                    "env": [{"name": "HF_HOME", "value": "/cache"}],
                    "labels": {"team": "vision", POOL_LABEL: "spoofed"},
                },
            },
        }
    )
    template = desired_deployment("p", "ns", "u", spec)["spec"]["template"]
    pod_spec = template["spec"]
    container = pod_spec["containers"][0]
    assert pod_spec["nodeSelector"] == {"pool": "a100"}
    assert pod_spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "1"}
    assert {"name": "HF_HOME", "value": "/cache"} in container["env"]
    assert template["metadata"]["labels"]["team"] == "vision"
    assert template["metadata"]["labels"][POOL_LABEL] == "p"


def test_whole_node_pool_runs_one_worker_per_node() -> None:
    deployment = desired_deployment("p", "ns", "u", make_spec(wholeNode=True))
    pod_spec = deployment["spec"]["template"]["spec"]
    anti = pod_spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert "nvidia.com/gpu" not in pod_spec["containers"][0]["resources"].get("limits", {})


# Conditions ------------------------------------------------------------------


def test_conditions_ready_reconciling_degraded() -> None:
    ready, phase = pool_conditions(PoolHealth(2, 2, 2, 0))
    assert phase == "Ready"
    assert [(c.type, c.status) for c in ready] == [
        ("Ready", True),
        ("Reconciling", False),
        ("Degraded", False),
    ]
    scaling, phase = pool_conditions(PoolHealth(3, 2, 2, 1))
    assert phase == "Reconciling"
    assert scaling[0].status is False
    down, phase = pool_conditions(
        PoolHealth(2, 2, 2, 0, error_reason="PrefectUnreachable", error_message="refused")
    )
    assert phase == "Degraded"
    assert [(c.type, c.status, c.reason) for c in down][2] == (
        "Degraded",
        True,
        "PrefectUnreachable",
    )


def test_last_transition_time_moves_only_on_flips() -> None:
    first, _ = pool_conditions(PoolHealth(1, 1, 1, 0))
    before = merge_conditions(None, first, 1, now="2026-01-01T00:00:00Z")
    same = merge_conditions(before, first, 2, now="2026-01-02T00:00:00Z")
    assert [c["lastTransitionTime"] for c in same] == ["2026-01-01T00:00:00Z"] * 3
    assert {c["observedGeneration"] for c in same} == {2}
    flipped, _ = pool_conditions(PoolHealth(2, 1, 1, 0))
    after = merge_conditions(same, flipped, 3, now="2026-01-03T00:00:00Z")
    ready = next(c for c in after if c["type"] == "Ready")
    assert (ready["status"], ready["lastTransitionTime"]) == ("False", "2026-01-03T00:00:00Z")


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_are_not_workers(phase: str) -> None:
    assert pod("a", phase=phase).finished
