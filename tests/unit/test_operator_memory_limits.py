"""spec.gpu.memory: each worker's GPU memory limit beside its slot limit (issue 24).

The memory limit ``{prefix}-memory:{pod}`` is one more ledger entry of the pod
(kind ``memory``, sized in whole GiB): planned, sized, deleted and recreated as
the slot limit is, and kept out of what counts slots and workers.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pgw_operator.desired import desired_deployment
from pgw_operator.plan import (
    LimitAction,
    deletion_costs,
    desired_limit_names,
    ledger_from_status,
    ledger_to_status,
    plan_limits,
    pod_limits,
    settle,
)
from pgw_operator.scaling import slots_per_worker
from pgw_operator.sizing import (
    MIB,
    LimitSize,
    SizingProblem,
    parse_memory_quantity,
    size_memory_limit,
)
from pgw_operator.status import observed_health, status_body
from pgw_operator.worker_limits import records_of
from prefect_gpu_workers.naming import parse_memory_mib

from builders import (
    GFD_NODES,
    NODES,
    by_name,
    entry,
    make_spec,
    memory_entry,
    pod,
    pool_spec,
    prefect_memory_limit,
)
from builders import prefect_limit as prefect

MEMORY_NODES = {**NODES, **GFD_NODES}
H100 = GFD_NODES["h100"]  # 81559 MiB: an "80GB" H100 has 79.6 GiB


def kinds(actions: list[LimitAction]) -> list[tuple[str, str, int]]:
    return sorted((a.kind, a.name, a.size) for a in actions)


def test_a_bound_pod_gets_its_slot_and_memory_limits_in_one_ledger() -> None:
    spec = make_spec(perWorker=2, memory="40Gi")
    pods = {"a": pod("a", gpus=2), "b": pod("b", node=None)}
    plan = plan_limits(spec, {}, pods, NODES, {})
    assert kinds(plan.actions) == [("create", "gpu-memory:a", 80), ("create", "gpu:a", 2)]
    # Write-ahead: both are in the ledger, as entries of the pod, before they exist.
    memory = plan.ledger["gpu-memory:a"]
    assert (memory.kind, memory.pod, memory.size, memory.state) == ("memory", "a", 80, "Creating")
    assert plan.ledger["gpu:a"].kind == "slots"
    assert "spec.gpu.memory 40Gi per GPU -> 40 GiB per GPU x 2 = 80 GiB" in next(
        a.why for a in plan.actions if a.name == "gpu-memory:a"
    )
    settled = settle(plan, plan.actions)
    assert {e.state for e in settled.values()} == {"Ready"}
    # Read from Prefect next pass: the desired names include the memory limit.
    assert desired_limit_names(spec, pods) == {"gpu:a", "gpu-memory:a"}
    again = plan_limits(
        spec, settled, pods, NODES, by_name(prefect("a", limit=2), prefect_memory_limit("a", 80))
    )
    assert again.actions == []


def test_without_spec_gpu_memory_there_is_no_memory_limit() -> None:
    spec = make_spec(perWorker=1)
    assert spec.gpu_memory is None
    assert pod_limits(spec, "a") == {"slots": "gpu:a"}
    plan = plan_limits(spec, {}, {"a": pod("a")}, NODES, {})
    assert [(a.kind, a.name) for a in plan.actions] == [("create", "gpu:a")]
    assert {e.kind for e in plan.ledger.values()} == {"slots"}


def test_auto_reads_each_gpus_memory_from_the_node_label_rounded_down_to_gib() -> None:
    spec = make_spec(perWorker=2, memory="auto")
    plan = plan_limits(spec, {}, {"a": pod("a", node="h100", gpus=2)}, MEMORY_NODES, {})
    # 81559 MiB is 79.6 GiB: 79 per GPU, never more than the GPU has.
    assert kinds(plan.actions) == [("create", "gpu-memory:a", 158), ("create", "gpu:a", 2)]
    why = next(a.why for a in plan.actions if a.name == "gpu-memory:a")
    assert "nvidia.com/gpu.memory=81559 MiB -> 79 GiB per GPU" in why


@pytest.mark.parametrize(
    ("node", "resource", "gpus", "memory", "gib", "behind"),
    [
        # Two replicas of a 4-way time-sliced 80 GiB GPU are half of it.
        ("sliced", "nvidia.com/gpu", 2, "auto", 40, "0.5"),
        ("sliced", "nvidia.com/gpu", 1, "80Gi", 20, "0.25"),
        # A MIG slice is a device of its own memory (19968 MiB: 19 GiB).
        ("mig-2g", "nvidia.com/mig-2g.20gb", 2, "auto", 38, "2 mig-2g.20gb"),
        ("gpu-8", "nvidia.com/gpu", 1, "40960Mi", 40, "1"),
        ("gpu-8", "nvidia.com/gpu", 1, "80G", 74, "1"),  # 80e9 bytes = 74.5 GiB
    ],
)
def test_memory_limit_sizes_per_gpu_times_the_pods_gpus(
    node: str, resource: str, gpus: int, memory: str, gib: int, behind: str
) -> None:
    spec = make_spec(perWorker=gpus, memory=memory, resourceName=resource)
    facts = replace(pod("a", node=node, gpus=None), limits={resource: str(gpus)})
    sized = size_memory_limit(facts, MEMORY_NODES[node], spec)
    assert isinstance(sized, LimitSize), sized
    assert (sized.size, sized.gpus) == (gib, behind)


def test_whole_node_workers_get_the_nodes_memory() -> None:
    spec = make_spec(wholeNode=True, memory="auto")
    sized = size_memory_limit(pod("a", node="h100", gpus=None), H100, spec)
    assert isinstance(sized, LimitSize)
    assert sized.size == 8 * 79


def test_a_missing_memory_label_is_a_problem_naming_it_and_no_memory_limit() -> None:
    spec = make_spec(perWorker=1, memory="auto")
    plan = plan_limits(spec, {}, {"a": pod("a")}, NODES, {})  # gpu-8 has no memory label
    # The slot limit does not need the label; the memory limit is never guessed.
    assert [(a.kind, a.name) for a in plan.actions] == [("create", "gpu:a")]
    assert "gpu-memory:a" not in plan.ledger
    (problem,) = plan.problems
    assert "node gpu-8 has no label nvidia.com/gpu.memory" in problem
    assert "spec.gpu.memory: auto" in problem
    assert observed_health(1, plan.ledger, {"a": pod("a")}, tuple(plan.problems)).problems


def test_one_cause_that_stops_both_limits_is_said_once() -> None:
    spec = make_spec(perWorker=1, memory="40Gi")
    plan = plan_limits(spec, {}, {"a": pod("a", gpus=None)}, NODES, {})
    assert plan.actions == []
    assert plan.problems == ["pod a has no nvidia.com/gpu limit on its worker container"]


def test_less_than_a_gib_is_a_problem_never_a_zero_limit() -> None:
    spec = make_spec(perWorker=1, memory="512Mi")
    problem = size_memory_limit(pod("a"), NODES["gpu-8"], spec)
    assert isinstance(problem, SizingProblem)
    assert "no whole GiB" in problem.reason


def test_the_memory_limit_goes_with_its_pod() -> None:
    spec = make_spec(perWorker=1, memory="80Gi")
    ledger = {
        e.limit_name: e for e in (entry("a"), memory_entry("a"), entry("b"), memory_entry("b"))
    }
    existing = by_name(
        prefect("a"), prefect_memory_limit("a"), prefect("b"), prefect_memory_limit("b")
    )
    plan = plan_limits(spec, ledger, {"a": pod("a")}, NODES, existing)
    assert kinds(plan.actions) == [("delete", "gpu-memory:b", 0), ("delete", "gpu:b", 0)]
    assert {a.why for a in plan.actions} == {"pod b is gone"}
    assert plan.ledger["gpu-memory:b"].state == "Deleting"  # until Prefect confirms
    assert set(settle(plan, plan.actions)) == {"gpu:a", "gpu-memory:a"}
    # A memory limit not found for a gone pod is deleted all the same (a 404 is fine).
    gone = plan_limits(spec, {"gpu-memory:c": memory_entry("c")}, {}, NODES, {})
    assert kinds(gone.actions) == [("delete", "gpu-memory:c", 0)]


def test_a_memory_limit_deleted_behind_our_back_is_created_again() -> None:
    spec = make_spec(perWorker=1, memory="80Gi")
    ledger = {"gpu:a": entry("a"), "gpu-memory:a": memory_entry("a")}
    plan = plan_limits(spec, ledger, {"a": pod("a")}, NODES, by_name(prefect("a")))
    assert kinds(plan.actions) == [("create", "gpu-memory:a", 80)]


def test_spec_changes_resize_or_remove_the_memory_limit() -> None:
    ledger = {"gpu:a": entry("a"), "gpu-memory:a": memory_entry("a", size=80)}
    existing = by_name(prefect("a"), prefect_memory_limit("a", 80))
    smaller = plan_limits(make_spec(perWorker=1, memory="40Gi"), ledger, {"a": pod("a")},
                          NODES, existing)  # fmt: skip
    assert kinds(smaller.actions) == [("resize", "gpu-memory:a", 40)]
    # spec.gpu.memory unset: the memory limit goes, the pod and its slot limit stay.
    off = plan_limits(make_spec(perWorker=1), ledger, {"a": pod("a")}, NODES, existing)
    assert [(a.kind, a.name) for a in off.actions] == [("delete", "gpu-memory:a")]
    assert "no longer names it" in off.actions[0].why
    assert off.ledger["gpu:a"].state == "Ready"


def test_a_restart_in_place_recreates_both_limits() -> None:
    spec = make_spec(perWorker=1, memory="80Gi")
    ledger = {"gpu:a": entry("a"), "gpu-memory:a": memory_entry("a")}
    existing = by_name(prefect("a", slots=1), prefect_memory_limit("a", slots=30))
    plan = plan_limits(spec, ledger, {"a": pod("a", restarts=1)}, NODES, existing)
    assert kinds(plan.actions) == [("recreate", "gpu-memory:a", 80), ("recreate", "gpu:a", 1)]
    settled = settle(plan, plan.actions)
    assert {(e.restarts, e.active_slots) for e in settled.values()} == {(1, 0)}


def test_memory_limits_count_neither_slots_nor_workers() -> None:
    ledger = {
        e.limit_name: e
        for e in (
            replace(entry("a", size=2), active_slots=1),
            replace(memory_entry("a", size=80), active_slots=30),
            entry("b", size=2),
            memory_entry("b", size=80, state="Creating"),
        )
    }
    pods = {"a": pod("a"), "b": pod("b")}
    health = observed_health(2, ledger, pods)
    assert health.ready_workers == 2  # each pod once, by its slot limit
    assert health.pending_limits == 1  # b's memory limit is still being made
    status = status_body("pool", 1, {}, ledger, health)
    assert status["gpuSlots"] == 4
    assert status["pendingLimits"] == 1
    # Each pod's object names both of its limits, its slot limit first.
    records = records_of("pool", ledger)
    assert {pod: [(r.kind, r.name) for r in rec.limits] for pod, rec in records.items()} == {
        "a": [("slots", "gpu:a"), ("memory", "gpu-memory:a")],
        "b": [("slots", "gpu:b"), ("memory", "gpu-memory:b")],
    }
    assert (records["a"].state, records["b"].state) == ("Ready", "Creating")
    # Scale-down cost is slots held, not GiB; autoscaling counts slots per worker.
    assert deletion_costs(ledger, pods) == {"a": 1}
    assert slots_per_worker(make_spec(wholeNode=True, memory="80Gi"), ledger) == 2


def test_the_ledger_kind_round_trips_and_old_entries_are_slot_limits() -> None:
    ledger = {"gpu:a": entry("a"), "gpu-memory:a": memory_entry("a", size=158, restarts=2)}
    assert ledger_from_status({"workers": ledger_to_status(ledger)}) == ledger
    old = {"workers": [{"limitName": "gpu:a", "pod": "a", "limitSize": 1, "state": "Ready"}]}
    assert ledger_from_status(old)["gpu:a"].kind == "slots"


def container_command(**gpu: object) -> list[str]:
    spec = pool_spec(gpu=gpu)
    (container,) = desired_deployment("p", "ns", "u", spec)["spec"]["template"]["spec"][
        "containers"
    ]
    command: list[str] = container["command"]
    return command


def option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def test_worker_command_says_its_gpus_and_their_stated_memory() -> None:
    stated = container_command(perWorker=2, memory="40Gi")
    assert (option(stated, "--gpus"), option(stated, "--gpu-memory")) == ("2", "40Gi")
    # auto: the worker reads NVML, else splits its memory limit over --gpus.
    auto = container_command(perWorker=2, memory="auto")
    assert (option(auto, "--gpus"), option(auto, "--gpu-memory")) == ("2", None)
    whole = container_command(wholeNode=True, memory="80Gi")
    assert (option(whole, "--gpus"), option(whole, "--gpu-memory")) == (None, "80Gi")
    # Unset: the command is exactly as before (no rollout of existing pools).
    unset = container_command(perWorker=2)
    assert "--gpus" not in unset
    assert "--gpu-memory" not in unset


CRD = Path(__file__).resolve().parents[2] / "crds" / "gpuworkerpools.gpuworkers.dev.yaml"


def memory_rule_pattern() -> str:
    """The pattern of the CRD's CEL rule on spec.gpu.memory (RE2; Python's re reads it alike)."""
    (version,) = yaml.safe_load(CRD.read_text())["spec"]["versions"]
    gpu = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["gpu"]
    (rule,) = gpu["properties"]["memory"]["x-kubernetes-validations"]
    assert "spec.gpu.memory" in rule["message"]
    match = re.search(r"self\.matches\('([^']+)'\)", rule["rule"])
    assert match is not None, rule
    return match.group(1)


@pytest.mark.parametrize(
    ("size", "admitted"),
    [("80Gi", True), ("40960Mi", True), ("1.5Gi", True), ("80G", True), ("1T", True),
     ("lots", False), ("80", False), ("80GiB", False), ("1048576Ki", False), ("80 Gi", False),
     ("-1Gi", False)],
)  # fmt: skip
def test_the_crd_admits_only_sizes_the_worker_reads_as_kubernetes_does(
    size: str, admitted: bool
) -> None:
    assert bool(re.match(memory_rule_pattern(), size)) is admitted
    if admitted:
        # A bare number is GiB to the worker but bytes to Kubernetes, Ki unknown
        # to the worker: the CRD keeps both out.
        assert parse_memory_mib(size) == parse_memory_quantity(size) // MIB
