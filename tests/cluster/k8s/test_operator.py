"""The operator against the real control plane and a real Prefect server.

Each test gets its own namespace and operator process; the module registers
its own fake nodes (tainted, so other tests' pods stay off them) and pools pin
themselves to one kind of node, so expected limit sizes are exact.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client
from recording_server import RecordingServer

from prefect_gpu_workers.server import LocalPrefectServer, free_port

from .cluster import DevCluster
from .operator_harness import (
    CRD,
    TEST_TAINT_KEYS,
    OperatorProcess,
    Pools,
    PrefectLimits,
    degraded_with,
    limits_of,
    pool_spec,
    pool_text,
    ready_with_limits,
    start_pool,
    unique,
    wait_established,
    wait_until,
)


def test_limits_are_sized_from_the_gpus_each_pod_has(
    operator: OperatorProcess,
    pools: Pools,
    limits: PrefectLimits,
    node_group: str,
    prefect_server: LocalPrefectServer,
) -> None:
    url = prefect_server.api_url
    cases: dict[str, tuple[str, dict[str, Any], int, int, str]] = {
        # pool: (node kind, gpu spec, replicas, expected slots per pod, expected gpus)
        "whole": ("gpu8", {"wholeNode": True}, 2, 8, "8"),
        "two": ("gpu4", {"perWorker": 2, "slotsPerGpu": 2}, 2, 4, "2"),
        "mig": (
            "mig",
            {"resourceName": "nvidia.com/mig-1g.10gb", "perWorker": 1},
            3,
            1,
            "1 mig-1g.10gb",
        ),
        "sliced": ("ts", {"wholeNode": True}, 1, 2, "2"),
    }
    for name, (kind, gpu, replicas, _, _) in cases.items():
        pools.create(name, pool_spec(url, node_group, kind, gpu, replicas))

    for name, (_, _, replicas, slots, gpus) in cases.items():
        found = wait_until(
            lambda n=name, r=replicas: ready_with_limits(pools, limits, n, r),
            f"pool {name} Ready with {replicas} sized limits",
            timeout=120,
        )
        assert {limit["limit"] for limit in found.values()} == {slots}, (name, found)
        status = pools.get(name)["status"]
        assert status["gpuSlots"] == slots * replicas
        assert status["readyReplicas"] == replicas
        assert status["observedGeneration"] == pools.get(name)["metadata"]["generation"]
        assert "workers" not in status  # counts only: each pod's limits are its own object
        workers = {w["pod"]: w for w in pools.limit_entries(name)}
        assert set(workers) == set(found)
        assert {w["gpus"] for w in workers.values()} == {gpus}
    # Whole-node workers each took a node of their own.
    whole_nodes = set(pools.running_pods("whole").values())
    assert whole_nodes == {f"{node_group}-gpu8a", f"{node_group}-gpu8b"}
    container = pools.worker_container("two")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    operator.assert_alive()


def test_scale_down_removes_exactly_the_removed_pods_limits(
    operator: OperatorProcess,
    pools: Pools,
    limits: PrefectLimits,
    node_group: str,
    prefect_server: LocalPrefectServer,
) -> None:
    spec = pool_spec(prefect_server.api_url, node_group, "gpu8", {"perWorker": 1}, 3)
    before = start_pool(pools, limits, "scaler", spec)
    # A worker in the middle of a GPU step: it holds a slot of its limit.
    busy = sorted(before)[0]
    limits.hold_slot(f"gpu:{busy}")
    pools.touch("scaler")  # any change wakes the operator; the 30 s resync would too
    wait_until(
        lambda: pools.deletion_cost(busy) == "1",
        "the busy worker's deletion cost",
    )

    pools.scale("scaler", 1)
    after = wait_until(lambda: ready_with_limits(pools, limits, "scaler", 1), "1 limit")
    (kept,) = after
    assert kept == busy, "scale-down removed the worker that held a GPU slot"
    removed = set(before) - {kept}
    wait_until(
        lambda: all(limits.get(f"gpu:{pod}") is None for pod in removed),
        "the removed pods' limits to go",
    )
    assert limits.get(f"gpu:{kept}") is not None

    pools.scale("scaler", 4)
    grown = wait_until(lambda: ready_with_limits(pools, limits, "scaler", 4), "4 limits")
    assert kept in grown
    assert len(pools.worker_limits("scaler")) == 4


def test_deleting_the_pool_removes_deployment_pods_and_limits(
    operator: OperatorProcess,
    pools: Pools,
    limits: PrefectLimits,
    node_group: str,
    prefect_server: LocalPrefectServer,
) -> None:
    spec = pool_spec(prefect_server.api_url, node_group, "gpu8", {"perWorker": 1}, 2)
    pods = start_pool(pools, limits, "doomed", spec)

    pools.delete("doomed")
    wait_until(lambda: not pools.exists("doomed"), "the pool to go (finalizer released)")
    wait_until(lambda: all(limits.get(f"gpu:{p}") is None for p in pods), "its limits to go")
    wait_until(lambda: not pools.pods("doomed"), "its pods to go")

    def deployment_gone() -> bool:
        try:
            pools.apps.read_namespaced_deployment("doomed", pools.namespace)
        except client.ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_until(deployment_gone, "its Deployment to go")


def test_orphans_removed_after_operator_downtime_hand_made_limits_untouched(
    operator: OperatorProcess,
    pools: Pools,
    limits: PrefectLimits,
    node_group: str,
    prefect_server: LocalPrefectServer,
) -> None:
    spec = pool_spec(prefect_server.api_url, node_group, "gpu8", {"perWorker": 1}, 2)
    old = start_pool(pools, limits, "resilient", spec)
    hand_made = [unique("gpu:hand-made"), f"gpu:resilient-{uuid.uuid4().hex[:4]}-manual"]
    for name in hand_made:
        limits.create(name, 3)

    operator.stop()
    for pod in old:
        pools.core.delete_namespaced_pod(pod, pools.namespace, grace_period_seconds=0)
    wait_until(lambda: not set(old) & set(pools.running_pods("resilient")), "old pods to go")
    assert all(limits.get(f"gpu:{pod}") is not None for pod in old), "nobody cleaned up yet"

    operator.start()
    new = wait_until(
        lambda: (
            (found := ready_with_limits(pools, limits, "resilient", 2))
            and not set(found) & set(old)
            and found
        ),
        "limits for the replacement pods",
    )
    wait_until(lambda: all(limits.get(f"gpu:{p}") is None for p in old), "orphans removed")
    for name in hand_made:
        assert (limits.get(name) or {}).get("limit") == 3, f"{name} was touched"
    assert len(new) == 2


def test_a_pool_with_the_old_ledger_in_its_status_moves_it_into_objects_losing_no_limit(
    operator: OperatorProcess,
    pools: Pools,
    limits: PrefectLimits,
    node_group: str,
    prefect_server: LocalPrefectServer,
) -> None:
    """An upgrade from a release that kept the ledger in ``status.workers``: each
    live pod's entry becomes its GpuWorkerLimit (the limit kept as it is, slots
    held and all), a gone pod's limit is deleted, then ``status.workers`` is cleared."""
    spec = pool_spec(prefect_server.api_url, node_group, "gpu8", {"perWorker": 1}, 2)
    found = start_pool(pools, limits, "upgraded", spec)
    wait_until(lambda: len(pools.worker_limits("upgraded")) == 2, "both objects")
    operator.stop()
    # What the old release left: its ledger in status, no objects, and the
    # limit of a pod that went while nobody watched.
    entries = [
        {"limitName": f"gpu:{pod}", "kind": "slots", "pod": pod, "node": "n",
         "limitSize": 1, "gpus": "1", "restarts": 0, "state": "Ready", "activeSlots": 0}
        for pod in [*sorted(found), "upgraded-gone"]
    ]  # fmt: skip
    limits.create("gpu:upgraded-gone", 1)
    for obj in pools.worker_limits("upgraded"):
        name = obj["metadata"]["name"]
        pools.custom.patch_namespaced_custom_object(
            "gpuworkers.dev", "v1alpha1", pools.namespace, "gpuworkerlimits", name,
            {"metadata": {"finalizers": None}},
        )  # fmt: skip
        pools.custom.delete_namespaced_custom_object(
            "gpuworkers.dev", "v1alpha1", pools.namespace, "gpuworkerlimits", name
        )
    pools.custom.patch_namespaced_custom_object_status(
        "gpuworkers.dev", "v1alpha1", pools.namespace, "gpuworkerpools", "upgraded",
        {"status": {"workers": entries}},
    )  # fmt: skip
    busy = sorted(found)[0]
    limits.hold_slot(f"gpu:{busy}")  # a recreated limit would start at 0 slots

    operator.start()
    wait_until(
        lambda: (
            "workers" not in pools.get("upgraded")["status"]
            and {e["pod"] for e in pools.limit_entries("upgraded")} == set(found)
        ),
        "the old ledger moved into objects and cleared",
    )
    wait_until(lambda: limits.get("gpu:upgraded-gone") is None, "the gone pod's limit deleted")
    held = limits.get(f"gpu:{busy}")
    assert held is not None
    assert held["active_slots"] == 1, "the busy worker's limit was recreated, not kept"
    assert all(limits.get(f"gpu:{pod}") is not None for pod in found)
    operator.assert_alive()


def test_gpu_memory_limits_live_and_die_with_their_pods(
    operator: OperatorProcess,
    pools: Pools,
    limits: PrefectLimits,
    node_group: str,
    prefect_server: LocalPrefectServer,
) -> None:
    """Issue 24: spec.gpu.memory gives each worker a memory limit beside its slot limit."""
    spec = pool_spec(prefect_server.api_url, node_group, "gpu8", {"perWorker": 2}, 2)
    spec["gpu"]["memory"] = "40Gi"

    def memory_limits(pods: set[str]) -> dict[str, int] | None:
        found = limits_of(limits, pods, "gpu-memory")
        return {pod: int(limit["limit"]) for pod, limit in found.items()} if found else None

    slot_limits = start_pool(pools, limits, "memory", spec)
    assert {int(limit["limit"]) for limit in slot_limits.values()} == {2}
    # 40 GiB per GPU x 2 GPUs, beside each pod's slot limit.
    first = wait_until(lambda: memory_limits(set(slot_limits)), "each pod's memory limit")
    assert first == dict.fromkeys(slot_limits, 80)
    entries = wait_until(
        lambda: len(found := pools.limit_entries("memory")) == 4 and found,
        "both limits of both pods in their objects",
    )
    status = pools.get("memory")["status"]
    assert {(w["pod"], w["kind"], w["limitName"], w["limitSize"]) for w in entries} == {
        entry
        for pod in slot_limits
        for entry in ((pod, "slots", f"gpu:{pod}", 2), (pod, "memory", f"gpu-memory:{pod}", 80))
    }
    assert status["gpuSlots"] == 4  # slots only, not GiB
    assert status["readyReplicas"] == 2  # each pod once
    command = pools.worker_container("memory")["command"]
    assert command[command.index("--gpus") + 1] == "2"
    assert command[command.index("--gpu-memory") + 1] == "40Gi"

    # A memory limit deleted behind the operator's back comes back.
    kept, gone = sorted(slot_limits)
    limits.delete(f"gpu-memory:{kept}")
    pools.touch("memory")
    wait_until(lambda: memory_limits({kept}) == {kept: 80}, "the deleted memory limit again")

    # A pod that goes takes both its limits; its replacement gets both.
    pools.core.delete_namespaced_pod(gone, pools.namespace, grace_period_seconds=0)
    wait_until(
        lambda: limits.get(f"gpu:{gone}") is None and limits.get(f"gpu-memory:{gone}") is None,
        "the deleted pod's slot and memory limits to go",
    )
    now = wait_until(
        lambda: (
            (found := ready_with_limits(pools, limits, "memory", 2))
            and gone not in found
            and memory_limits(set(found)) == dict.fromkeys(found, 80)
            and found
        ),
        "the replacement pod's slot and memory limits",
    )
    assert kept in now
    assert limits.get(f"gpu-memory:{kept}") is not None

    # The pool's finalizer deletes the memory limits with the slot limits.
    pools.delete("memory")
    wait_until(lambda: not pools.exists("memory"), "the pool to go (finalizer released)")
    left = {name for pod in now for name in (f"gpu:{pod}", f"gpu-memory:{pod}")}
    assert not left & limits.all_names(), left & limits.all_names()
    operator.assert_alive()


def test_prefect_outage_is_a_condition_and_the_pool_recovers(
    dev_cluster: DevCluster,
    namespace: str,
    node_group: str,
    pools: Pools,
    tmp_path: Path,
) -> None:
    server = LocalPrefectServer(home=tmp_path / "prefect", port=free_port()).start()
    operator = OperatorProcess(dev_cluster.kubeconfig, namespace, tmp_path / "operator.log").start()
    try:
        outage_limits = PrefectLimits(server.api_url)
        spec = pool_spec(server.api_url, node_group, "gpu4", {"perWorker": 1}, 1)
        start_pool(pools, outage_limits, "weathered", spec)

        server.stop()
        degraded = wait_until(
            lambda: (c := pools.condition("weathered", "Degraded")) and c["status"] == "True" and c,
            "Degraded condition",
            timeout=90,
        )
        assert degraded["reason"] == "PrefectUnreachable"
        assert pools.get("weathered")["status"]["phase"] == "Degraded"
        ready = pools.condition("weathered", "Ready")
        assert ready is not None
        assert ready["status"] == "False"
        # kopf posts Events from a queue of its own, a moment after the status.
        wait_until(lambda: unreachable_warnings(pools, "weathered"), "a PrefectUnreachable Event")

        # A change while Prefect is down wakes the pool: two more failed passes
        # (each a Warning Event) show the operator keeps retrying through the outage
        # without waiting a fixed time for it.
        failed_before = len(unreachable_warnings(pools, "weathered"))
        pools.scale("weathered", 2)
        wait_until(
            lambda: len(unreachable_warnings(pools, "weathered")) >= failed_before + 2,
            "two more failed passes during the outage",
            timeout=120,
        )
        operator.assert_alive()

        server.start()
        wait_until(
            lambda: ready_with_limits(pools, outage_limits, "weathered", 2),
            "recovery with both limits",
            timeout=120,
        )
        degraded_after = pools.condition("weathered", "Degraded")
        assert degraded_after is not None
        assert degraded_after["status"] == "False"
        operator.assert_alive()
    finally:
        operator.stop()
        print(f"--- operator log ---\n{operator.log_tail(60)}")
        server.stop()


def unreachable_warnings(pools: Pools, name: str) -> list[client.CoreV1Event]:
    """The pool's PrefectUnreachable Warning Events (kopf posts one per failed pass)."""
    return [
        e for e in pools.events(name) if e.type == "Warning" and e.reason == "PrefectUnreachable"
    ]


# Issue 16: what a pool's API URL answers never reaches status or Events, and a URL
# outside the operator's allowlist is never contacted ---------------------------------


def test_prefect_answers_never_reach_status_or_events(
    operator: OperatorProcess, pools: Pools, node_group: str
) -> None:
    marker = f"INTERNAL-SECRET-{uuid.uuid4().hex}"
    server = RecordingServer(404, json.dumps({"detail": marker}))
    with server.running():
        base = f"{server.url}/internal/admin"
        # Ensuring the work pool (GET, POST /work_pools/) ...
        pools.create("probe", pool_spec(base, node_group, "gpu8", {"perWorker": 1}, 0))
        # ... and reading the limit of a bound pod (GET /v2/concurrency_limits/gpu:<pod>).
        limits_spec = pool_spec(base, node_group, "gpu8", {"perWorker": 1}, 1)
        limits_spec["workPool"]["create"] = False
        pools.create("probe-limits", limits_spec)
        for name, reason in (("probe", "WorkPoolRejected"), ("probe-limits", "PrefectRejected")):
            condition = wait_until(
                lambda n=name, r=reason: degraded_with(pools, n, r), f"{name} Degraded ({reason})"
            )
            assert "HTTP 404" in condition["message"]
            wait_until(
                lambda n=name, r=reason: any(e.reason == r for e in pools.events(n)),
                f"{name}'s {reason} event",
            )
        hits = list(server.hits)
    print("probe requests:", [f"{h.method} {h.target}" for h in hits])
    print("probe condition:", pools.condition("probe", "Degraded"))
    for name in ("probe", "probe-limits"):
        assert marker not in pool_text(pools, name)
    # The operator's own paths below the pool's path; nothing turned into a query.
    assert {(h.method, h.target) for h in hits} >= {
        ("GET", "/internal/admin/work_pools/pool-" + node_group),
        ("POST", "/internal/admin/work_pools/"),
    }
    limit_reads = {
        h.target for h in hits if h.method == "GET" and "/concurrency_limits/" in h.target
    }
    assert limit_reads, "the bound pod's limit was never read"
    assert all(t.startswith("/internal/admin/v2/concurrency_limits/gpu%3Aprobe-limits-")
               for t in limit_reads), limit_reads  # fmt: skip
    assert all(h.target.startswith("/internal/admin/") and "?" not in h.target for h in hits)
    operator.assert_alive()


def test_a_url_outside_the_allowlist_is_never_contacted(
    dev_cluster: DevCluster,
    namespace: str,
    node_group: str,
    pools: Pools,
    limits: PrefectLimits,
    prefect_server: LocalPrefectServer,
    tmp_path: Path,
) -> None:
    server = RecordingServer(200, "[]")
    with server.running():
        # Created, with a ledger entry, before the operator runs: its first pass
        # and its finalizer both meet the allowlist.
        outside = pool_spec(f"{server.url}/api", node_group, "gpu8", {"perWorker": 1}, 1)
        pools.create("outside", outside)
        pools.custom.patch_namespaced_custom_object_status(
            "gpuworkers.dev", "v1alpha1", namespace, "gpuworkerpools", "outside",
            {"status": {"workers": [{"limitName": "gpu:outside-x", "pod": "outside-x",
                                     "state": "Ready"}]}},
        )  # fmt: skip
        allowed = (
            "--allowed-api-url", prefect_server.api_url,
            *(f"--allowed-toleration-key={key}" for key in TEST_TAINT_KEYS),
        )  # fmt: skip
        operator = OperatorProcess(
            dev_cluster.kubeconfig, namespace, tmp_path / "operator.log", extra_args=allowed
        ).start()
        try:
            condition = wait_until(
                lambda: degraded_with(pools, "outside", "ApiUrlNotAllowed"),
                "outside Degraded (ApiUrlNotAllowed)",
            )
            assert "spec.prefect.apiUrl" in condition["message"]
            assert "--allowed-api-url" in condition["message"]
            # A URL under the allowlist works as before.
            inside = pool_spec(prefect_server.api_url, node_group, "gpu8", {"perWorker": 1}, 1)
            start_pool(pools, limits, "inside", inside)

            pools.delete("outside")
            wait_until(lambda: not pools.exists("outside"), "outside to go (finalizer released)")
            operator.assert_alive()
        finally:
            operator.stop()
            print(f"--- operator log ---\n{operator.log_tail(60)}")
        assert server.hits == [], f"contacted: {server.hits}"
    # Refused before anything: not even a worker Deployment was made for it.
    with pytest.raises(client.ApiException) as info:
        pools.apps.read_namespaced_deployment("outside", namespace)
    assert info.value.status == 404
    assert "gpu:outside-x" in operator.log()  # the limit left behind is named


def test_reconcile_passes_are_timed_and_a_deleted_pool_leaves_no_series(
    dev_cluster: DevCluster,
    namespace: str,
    node_group: str,
    pools: Pools,
    prefect_server: LocalPrefectServer,
    tmp_path: Path,
) -> None:
    operator = OperatorProcess(
        dev_cluster.kubeconfig, namespace, tmp_path / "operator.log", metrics_port=free_port()
    ).start()
    labels = f'namespace="{namespace}",pool="idle"'
    try:
        # No replicas: its ledger stays empty, the case whose deletion kept its series.
        pools.create(
            "idle", pool_spec(prefect_server.api_url, node_group, "gpu8", {"perWorker": 1}, 0)
        )
        wait_until(
            lambda: (c := pools.condition("idle", "Ready")) and c["status"] == "True",
            "idle Ready",
        )
        samples = wait_until(
            lambda: (
                (m := operator.metrics()).get(f"pgw_reconcile_duration_seconds_count{{{labels}}}")
                and m
            ),
            "a timed reconcile pass",
        )
        assert samples[f"pgw_pool_workers_desired{{{labels}}}"] == 0

        pools.delete("idle")
        wait_until(lambda: not pools.exists("idle"), "idle to go")
        wait_until(
            lambda: not [k for k in operator.metrics() if labels in k],
            "every series of the deleted pool to go",
        )
        operator.assert_alive()
    finally:
        operator.stop()
        print(f"--- operator log ---\n{operator.log_tail(40)}")


INVALID_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("both gpu modes", {"gpu": {"perWorker": 1, "wholeNode": True}}, "spec.gpu.perWorker"),
    ("no gpu mode", {"gpu": {}}, "spec.gpu.perWorker"),
    ("negative replicas", {"replicas": -1}, "spec.replicas"),
    ("bad api url", {"prefect": {"apiUrl": "ftp://prefect"}}, "spec.prefect.apiUrl"),
    ("bad prefix", {"gpu": {"perWorker": 1, "limitPrefix": "GPU"}}, "spec.gpu.limitPrefix"),
    ("bad resource", {"gpu": {"perWorker": 1, "resourceName": "gpu"}}, "spec.gpu.resourceName"),
    ("bad pool name", {"workPool": {"name": "a/b"}}, "spec.workPool.name"),
    ("zero slots", {"gpu": {"perWorker": 1, "slotsPerGpu": 0}}, "spec.gpu.slotsPerGpu"),
    (
        "memory and slots per gpu",
        {"gpu": {"perWorker": 1, "memoryPerSlot": "20Gi", "slotsPerGpu": 2}},
        "spec.gpu.memoryPerSlot",
    ),
    ("bad memory", {"gpu": {"perWorker": 1, "memoryPerSlot": "20GiB"}}, "spec.gpu.memoryPerSlot"),
    ("gpu memory not a size", {"gpu": {"perWorker": 1, "memory": "lots"}}, "spec.gpu.memory"),
    ("gpu memory without a unit", {"gpu": {"perWorker": 1, "memory": "80"}}, "spec.gpu.memory"),
    (
        "gpu memory with a long prefix",
        {"gpu": {"perWorker": 1, "memory": "auto", "limitPrefix": "p" * 57}},
        "spec.gpu.limitPrefix",
    ),
    ("no image", {"worker": {}}, "spec.worker.image"),
    (
        "worker id override",
        {"worker": {"image": "i", "podTemplate": {"env": [{"name": "WORKER_ID", "value": "x"}]}}},
        "spec.worker.podTemplate.env[0]",
    ),
]


# Pool API URLs refused at admission, each with the rule its message names (the
# operator repeats the rules: tests/unit/test_operator_api_url.py).
REJECTED_API_URLS: list[tuple[str, str, str]] = [
    ("scheme", "ftp://prefect/api", "must start with http:// or https://"),
    ("scheme-relative", "//prefect/api", "must start with http:// or https://"),
    ("userinfo", "http://user:pw@prefect/api", "userinfo"),
    ("userinfo host", "http://prefect@127.0.0.1:8080/api", "userinfo"),
    ("query", "http://127.0.0.1:8080/internal/admin?x=", "query"),
    ("fragment", "http://prefect/api#x", "fragment"),
    ("whitespace", "http://prefect/ api", "whitespace"),
    ("newline", "http://prefect/api\n", "whitespace"),
    ("backslash", "http://evil\\prefect/api", "URL characters"),
    ("non-ascii", "http://pr\u00e9fect/api", "URL characters"),
    ("no host", "http:///api", "must name a host"),
    ("dot segments", "http://prefect/api/../admin", ". or .. path segments"),
    ("encoded dots", "http://prefect/api/%2e%2e/admin", ". or .. path segments"),
    ("encoded slash", "http://prefect/api%2F..%2Fadmin", "percent-encode"),
    ("bad port", "http://prefect:99999/api", "port"),
    ("decimal address", "http://2130706433:4200/api", "four decimal numbers"),
    ("hex address", "http://0x7f.1:4200/api", "four decimal numbers"),
    ("octal address", "http://0177.0.0.1:4200/api", "four decimal numbers"),
    ("mapped address", "http://[::ffff:a00:1]:4200/api", "not inside an IPv6 one"),
    ("6to4 address", "http://[2002:a00:1::1]/api", "not inside an IPv6 one"),
    ("metadata address", "http://169.254.169.254/latest", "link-local"),
    ("link-local v6", "http://[fe80::1]/api", "link-local"),
]
INVALID_SPECS += [
    (f"api url {name}", {"prefect": {"apiUrl": url}}, "spec.prefect.apiUrl")
    for name, url, _ in REJECTED_API_URLS
]


@pytest.fixture(scope="module")
def isolated_group(dev_cluster: DevCluster) -> Iterator[str]:
    """This checkout's CRD served under an API group of its own, for admission tests.

    The cluster is shared: other checkouts apply their own version of the
    gpuworkers.dev CRD at any time, so rules are tested on a private copy.
    """
    group = f"t{uuid.uuid4().hex[:8]}.gpuworkers.dev"
    crd = yaml.safe_load(CRD.read_text())
    crd["metadata"]["name"] = f"gpuworkerpools.{group}"
    crd["spec"]["group"] = group
    dev_cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(crd))
    wait_established(dev_cluster, f"gpuworkerpools.{group}")
    yield group
    dev_cluster.kubectl("delete", "crd", f"gpuworkerpools.{group}", "--wait=false")


def admit(
    dev_cluster: DevCluster, namespace: str, group: str, spec: dict[str, Any], name: str = "p"
) -> dict[str, Any]:
    """Create a pool of the isolated group without storing it (dry run); the API's answer."""
    body = {"apiVersion": f"{group}/v1alpha1", "kind": "GpuWorkerPool",
            "metadata": {"name": name}, "spec": spec}  # fmt: skip
    created = client.CustomObjectsApi(dev_cluster.api_client()).create_namespaced_custom_object(
        group, "v1alpha1", namespace, "gpuworkerpools", body, dry_run="All"
    )
    return cast(dict[str, Any], created)


def minimal_spec(**overrides: Any) -> dict[str, Any]:
    return {
        "workPool": {"name": "p"},
        "prefect": {"apiUrl": "http://prefect/api"},
        "gpu": {"perWorker": 1},
        "worker": {"image": "i"},
        **overrides,
    }


@pytest.mark.parametrize(
    ("url", "rule"),
    [(u, r) for _, u, r in REJECTED_API_URLS],
    ids=[n for n, _, _ in REJECTED_API_URLS],
)
def test_api_urls_are_rejected_at_admission_naming_the_field_and_rule(
    dev_cluster: DevCluster, namespace: str, isolated_group: str, url: str, rule: str
) -> None:
    with pytest.raises(client.ApiException) as info:
        admit(dev_cluster, namespace, isolated_group, minimal_spec(prefect={"apiUrl": url}))
    assert info.value.status == 422
    assert "spec.prefect.apiUrl" in str(info.value.body)
    assert rule in str(info.value.body), info.value.body


@pytest.mark.parametrize(
    "url",
    [
        "http://prefect-server.prefect.svc.cluster.local:4200/api",
        "https://api.prefect.cloud/api/accounts/1b2c/workspaces/3d4e",
        "http://127.0.0.1:4200/api/",
        "http://[::1]:4200/api",
        "http://10.0.0.7:4200/api",
        "http://prefect-1.example/api",  # a name whose last label is not a number
    ],
)
def test_plain_api_urls_are_admitted(
    dev_cluster: DevCluster, namespace: str, isolated_group: str, url: str
) -> None:
    spec = minimal_spec(prefect={"apiUrl": url})
    created = admit(dev_cluster, namespace, isolated_group, spec)
    assert created["spec"]["prefect"]["apiUrl"] == url


@pytest.mark.parametrize("memory", ["auto", "80Gi", "40960Mi", "1.5Ti", "80G"])
def test_gpu_memory_auto_or_a_size_with_a_unit_is_admitted(
    dev_cluster: DevCluster, namespace: str, isolated_group: str, memory: str
) -> None:
    spec = minimal_spec(gpu={"perWorker": 2, "memory": memory})
    created = admit(dev_cluster, namespace, isolated_group, spec)
    assert created["spec"]["gpu"]["memory"] == memory


@pytest.mark.parametrize("length", [64, 253])
def test_pool_names_longer_than_a_label_value_are_rejected(
    dev_cluster: DevCluster, namespace: str, isolated_group: str, length: int
) -> None:
    with pytest.raises(client.ApiException) as info:
        admit(dev_cluster, namespace, isolated_group, minimal_spec(), "p" * length)
    assert info.value.status == 422
    assert "metadata.name must be at most 63 characters" in str(info.value.body)
    # The longest name a label value takes is admitted.
    assert admit(dev_cluster, namespace, isolated_group, minimal_spec(), "p" * 63)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [(o, f) for _, o, f in INVALID_SPECS],
    ids=[i for i, _, _ in INVALID_SPECS],
)
def test_invalid_pools_are_rejected_naming_the_field(
    dev_cluster: DevCluster,
    namespace: str,
    isolated_group: str,
    overrides: dict[str, Any],
    field: str,
) -> None:
    with pytest.raises(client.ApiException) as info:
        admit(dev_cluster, namespace, isolated_group, minimal_spec(**overrides))
    assert info.value.status == 422
    assert field in str(info.value.body), info.value.body


# End to end, with real workers in real containers: test_real_node.py.
