"""Backlog autoscaling and the disruption budget, with the real operator and Prefect server.

The workers never run (kwok plays the kubelet): the runs stay Scheduled, which
is exactly a backlog. The operator scales the pool through its /scale
subresource; the Deployment, pods and limits follow.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from kubernetes import client
from prefect.client.orchestration import get_client

from prefect_gpu_workers.server import LocalPrefectServer

from .cluster import DevCluster
from .operator_harness import (
    GROUP_LABEL,
    OperatorProcess,
    Pools,
    PrefectLimits,
    install_crd,
    running_operator,
    unique,
    wait_until,
)


@pytest.fixture(scope="module")
def gpu_node(dev_cluster: DevCluster) -> Iterator[str]:
    """One fake 8-GPU node of this module, tainted so that only its pools land there."""
    install_crd(dev_cluster)
    group = f"as-{uuid.uuid4().hex[:5]}"
    dev_cluster.add_node(
        f"{group}-gpu8",
        gpus=8,
        labels={GROUP_LABEL: group},
        taints=[{"key": GROUP_LABEL, "value": group, "effect": "NoSchedule"}],
    )
    yield group
    dev_cluster.remove_node(f"{group}-gpu8")


@pytest.fixture
def operator(
    dev_cluster: DevCluster, namespace: str, gpu_node: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    with running_operator(dev_cluster, namespace, tmp_path / "operator.log") as proc:
        yield proc


def autoscaled_spec(api_url: str, group: str, work_pool: str, **extra: Any) -> dict[str, Any]:
    toleration = {"key": GROUP_LABEL, "operator": "Equal", "value": group, "effect": "NoSchedule"}
    return {
        "replicas": 0,
        "workPool": {"name": work_pool, "flowRunsPerWorker": 10},
        "prefect": {"apiUrl": api_url},
        "gpu": {"perWorker": 1},
        "worker": {
            "image": "registry.invalid/prefect-gpu-worker:test",
            "drainGracePeriodSeconds": 0,
            "podTemplate": {
                "nodeSelector": {GROUP_LABEL: group},
                "tolerations": [toleration],
            },
        },
        **extra,
    }


def autoscaling_status(pools: Pools, name: str) -> dict[str, Any]:
    status: dict[str, Any] = (pools.get(name).get("status") or {}).get("autoscaling") or {}
    return status


def running_with_limits(pools: Pools, limits: PrefectLimits, name: str, count: int) -> bool:
    running = pools.running_pods(name)
    return len(running) == count and all(limits.get(f"gpu:{pod}") for pod in running)


def event_messages(pools: Pools, name: str, reason: str) -> list[str]:
    return [str(e.message) for e in pools.events(name) if e.reason == reason]


def test_a_backlog_of_30_runs_scales_the_pool_from_zero_and_back(
    operator: OperatorProcess,
    dev_cluster: DevCluster,
    namespace: str,
    gpu_node: str,
    prefect_server: LocalPrefectServer,
) -> None:
    pools, limits = Pools(dev_cluster, namespace), PrefectLimits(prefect_server.api_url)
    work_pool = unique("as-pool")
    autoscaling = {"minReplicas": 0, "maxReplicas": 5, "pollIntervalSeconds": 2,
                   "scaleDownDelaySeconds": 10, "cooldownSeconds": 0}  # fmt: skip
    pools.create("auto", autoscaled_spec(prefect_server.api_url, gpu_node, work_pool,
                                         autoscaling=autoscaling))  # fmt: skip
    idle = wait_until(
        lambda: (s := autoscaling_status(pools, "auto")).get("reason") == "Steady" and s,
        "the autoscaler to see an empty work pool",
    )
    assert idle["desiredReplicas"] == 0
    assert idle["backlog"] == {"scheduled": 0, "pending": 0, "running": 0}
    assert pools.get("auto")["spec"]["replicas"] == 0

    with get_client(sync_client=True) as prefect:
        flow_id = prefect.create_flow_from_name(unique("as-flow"))
        deployment_id = prefect.create_deployment(flow_id, "as", work_pool_name=work_pool)
        run_ids: list[UUID] = [
            prefect.create_flow_run_from_deployment(deployment_id).id for _ in range(30)
        ]

        # 30 runs at 10 per worker: 3 workers, each with its limit.
        wait_until(
            lambda: running_with_limits(pools, limits, "auto", 3),
            "3 workers with their limits for 30 queued runs",
            timeout=120,
        )
        assert pools.get("auto")["spec"]["replicas"] == 3
        # The first read may have caught the runs still being created: wait for all 30.
        scaled = wait_until(
            lambda: (a := autoscaling_status(pools, "auto"))["backlog"]["scheduled"] == 30 and a,
            "status to show the whole backlog",
        )
        assert scaled["desiredReplicas"] == 3
        assert scaled["lastScaleTime"]
        # One event per change (runs created one by one may take several steps).
        wait_until(
            lambda: any(" -> 3: " in m for m in event_messages(pools, "auto", "ScaledUp")),
            "a ScaledUp event to 3 workers",
        )
        series = f'pgw_pool_backlog_runs{{namespace="{namespace}",pool="auto",state="scheduled"}}'
        wait_until(lambda: operator.metrics().get(series) == 30.0, "the backlog metric")

        for run_id in run_ids:
            prefect.delete_flow_run(run_id)

    # No backlog: after scaleDownDelaySeconds the pool goes back to zero.
    wait_until(
        lambda: pools.get("auto")["spec"]["replicas"] == 0,
        "the pool to scale to zero once idle",
        timeout=120,
    )
    # Events are posted asynchronously: wait for it. The count may have come
    # down in steps while the runs were being deleted one by one.
    (message,) = wait_until(
        # `or None`: wait_until takes any value but None and False as the answer,
        # and an empty list came back before the Event was posted (a cold CI run).
        lambda: event_messages(pools, "auto", "ScaledToZero") or None,
        "the ScaledToZero event",
    )
    assert " -> 0: 0 runs" in message
    assert message.endswith("for 10s")
    wait_until(lambda: not pools.running_pods("auto"), "the workers to go")
    wait_until(
        lambda: not {n for n in limits.all_names() if n.startswith("gpu:auto-")},
        "their limits to go",
    )
    assert autoscaling_status(pools, "auto")["reason"] in ("ScaledToZero", "Steady")
    operator.assert_alive()


def test_the_disruption_budget_lets_one_worker_go_at_a_time_and_is_turned_off_when_unset(
    operator: OperatorProcess,
    dev_cluster: DevCluster,
    namespace: str,
    gpu_node: str,
    prefect_server: LocalPrefectServer,
) -> None:
    pools, limits = Pools(dev_cluster, namespace), PrefectLimits(prefect_server.api_url)
    policy = client.PolicyV1Api(dev_cluster.api_client())

    def budget() -> dict[str, Any]:
        pdb = policy.read_namespaced_pod_disruption_budget("guarded", namespace)
        body: dict[str, Any] = policy.api_client.sanitize_for_serialization(pdb)
        return body

    def counted(allowed: int) -> bool:
        status = budget().get("status") or {}
        return (status.get("expectedPods"), status.get("currentHealthy"),
                status.get("disruptionsAllowed")) == (2, 2, allowed)  # fmt: skip

    # maxUnavailable is at least 1 (0 would block every node drain): of two
    # workers, one at a time may go.
    spec = autoscaled_spec(prefect_server.api_url, gpu_node, unique("pdb-pool"),
                           disruption={"maxUnavailable": 1})  # fmt: skip
    spec["replicas"] = 2
    pools.create("guarded", spec)
    wait_until(lambda: running_with_limits(pools, limits, "guarded", 2), "2 workers")
    pdb = budget()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == {"matchLabels": {"gpuworkers.dev/pool": "guarded"}}
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["metadata"]["ownerReferences"][0]["kind"] == "GpuWorkerPool"
    wait_until(lambda: counted(1), "the disruption controller to allow one of two workers")

    # spec.disruption unset: the operator turns the budget off (it deletes nothing).
    dev_cluster.kubectl("-n", namespace, "patch", "gpuworkerpool", "guarded", "--type=json",
                        "-p", '[{"op": "remove", "path": "/spec/disruption"}]')  # fmt: skip
    wait_until(
        lambda: budget()["spec"]["maxUnavailable"] == "100%" and counted(2),
        "the budget turned off and counted",
    )
    # What `kubectl drain` does: evict. Both workers may go now.
    for pod in sorted(pools.running_pods("guarded")):
        body = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=namespace))
        pools.core.create_namespaced_pod_eviction(pod, namespace, body, dry_run="All")
    operator.assert_alive()
