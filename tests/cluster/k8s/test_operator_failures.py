"""The operator's failure paths, against the real control plane and real Prefect servers.

Each failure is made with a real part where one exists: a Prefect server that
requires credentials answers 401 itself, a Secret is really missing, the API
server itself rejects a Deployment, a Prefect server is really stopped. Only
5xx answers come from a proxy (:class:`~recording_server.FaultProxy`) in front
of a real Prefect server, since a healthy Prefect does not give them on demand.
Each test checks what a user sees: the pool's conditions, its Events, and the
operator's metrics endpoint; and that the operator stays up and recovers.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from recording_server import FaultProxy

from prefect_gpu_workers.server import LocalPrefectServer, free_port

from .cluster import DevCluster
from .operator_harness import (
    OperatorProcess,
    Pools,
    PrefectLimits,
    degraded_with,
    pool_spec,
    ready_with_limits,
    settle,
    start_pool,
    wait_until,
)


def errors_counted(operator: OperatorProcess, namespace: str, pool: str, reason: str) -> float:
    """``pgw_reconcile_errors_total`` for one pool and reason, from the metrics endpoint."""
    labels = f'namespace="{namespace}",pool="{pool}",reason="{reason}"'
    return operator.metrics().get(f"pgw_reconcile_errors_total{{{labels}}}", 0.0)


def warned(pools: Pools, pool: str, reason: str) -> list[str]:
    """Messages of the pool's Warning Events with ``reason``."""
    return [
        str(e.message) for e in pools.events(pool) if e.type == "Warning" and e.reason == reason
    ]


def ready(pools: Pools, pool: str) -> bool:
    condition = pools.condition(pool, "Ready")
    return bool(condition and condition["status"] == "True")


def assert_failure_is_visible(
    operator: OperatorProcess, pools: Pools, namespace: str, pool: str, reason: str
) -> dict[str, Any]:
    """The pool says ``reason`` in its Degraded condition, a Warning Event and the
    metrics; it is not Ready; the operator is up. Returns the condition."""
    condition: dict[str, Any] = wait_until(
        lambda: degraded_with(pools, pool, reason), f"{pool} Degraded ({reason})"
    )
    assert not ready(pools, pool)
    wait_until(lambda: warned(pools, pool, reason), f"a {reason} Warning Event on {pool}")
    wait_until(
        lambda: errors_counted(operator, namespace, pool, reason) >= 1,
        f"pgw_reconcile_errors_total for {reason}",
    )
    operator.assert_alive()
    return condition


def test_prefect_refusing_the_credentials_is_named_on_the_pool(
    operator: OperatorProcess,
    namespace: str,
    node_group: str,
    pools: Pools,
    tmp_path: Path,
) -> None:
    # A real Prefect server that requires credentials: it answers 401 itself.
    server = LocalPrefectServer(
        home=tmp_path / "prefect-auth",
        extra_env={"PREFECT_SERVER_API_AUTH_STRING": "admin:not-what-the-key-says"},
    ).start()
    try:
        pools.core.create_namespaced_secret(
            namespace,
            client.V1Secret(metadata=client.V1ObjectMeta(name="prefect-key"),
                            string_data={"api-key": "pnu_wrong"}),
        )  # fmt: skip
        spec = pool_spec(server.api_url, node_group, "gpu4", {"perWorker": 1}, 1)
        spec["prefect"]["apiKeySecretRef"] = {"name": "prefect-key"}
        pools.create("locked-out", spec)

        condition = assert_failure_is_visible(
            operator, pools, namespace, "locked-out", "PrefectUnauthorized"
        )
        assert "HTTP 401" in condition["message"]
        assert "spec.prefect.apiKeySecretRef" in condition["message"]
        assert "pnu_wrong" not in str(pools.get("locked-out"))  # the key never shows
    finally:
        server.stop()


def test_prefect_answering_5xx_degrades_the_pool_until_it_answers_again(
    operator: OperatorProcess,
    namespace: str,
    node_group: str,
    pools: Pools,
    limits: PrefectLimits,
    prefect_server: LocalPrefectServer,
) -> None:
    proxy = FaultProxy(upstream=prefect_server.api_url.removesuffix("/api"))
    with proxy.running():
        spec = pool_spec(f"{proxy.url}/api", node_group, "gpu4", {"perWorker": 1}, 1)
        before = start_pool(pools, limits, "flaky", spec)

        proxy.fail(503)
        pools.scale("flaky", 2)  # a change to make while Prefect fails
        condition = assert_failure_is_visible(
            operator, pools, namespace, "flaky", "PrefectServerError"
        )
        assert "HTTP 503" in condition["message"]
        assert "injected fault" not in str(pools.get("flaky"))  # answers stay in the log
        degraded = f'pgw_pool_degraded{{namespace="{namespace}",pool="flaky"}}'
        wait_until(lambda: operator.metrics().get(degraded) == 1.0, "pgw_pool_degraded 1")

        proxy.heal()
        after = wait_until(
            lambda: ready_with_limits(pools, limits, "flaky", 2), "flaky Ready with 2 limits"
        )
        assert set(before) <= set(after)  # the first worker's limit survived the fault
        healed = pools.condition("flaky", "Degraded")
        assert healed is not None
        assert healed["status"] == "False"
        wait_until(lambda: operator.metrics().get(degraded) == 0.0, "pgw_pool_degraded 0")
        # kopf posts Events from a queue of its own, a moment after the status.
        wait_until(
            lambda: any(e.reason == "Recovered" for e in pools.events("flaky")),
            "a Recovered Event",
        )
        assert proxy.faulted > 0
        operator.assert_alive()


def test_a_missing_api_key_secret_is_named_and_the_pool_starts_once_it_exists(
    operator: OperatorProcess,
    namespace: str,
    node_group: str,
    pools: Pools,
    limits: PrefectLimits,
    prefect_server: LocalPrefectServer,
) -> None:
    spec = pool_spec(prefect_server.api_url, node_group, "gpu4", {"perWorker": 1}, 1)
    spec["prefect"]["apiKeySecretRef"] = {"name": "not-yet"}
    pools.create("keyless", spec)

    condition = assert_failure_is_visible(
        operator, pools, namespace, "keyless", "ApiKeySecretUnavailable"
    )
    assert "spec.prefect.apiKeySecretRef not-yet/api-key" in condition["message"]

    # An open-source Prefect server ignores the key: with the Secret in place the pool runs.
    pools.core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="not-yet"),
            data={"api-key": base64.b64encode(b"pnu_any").decode()},
        ),
    )
    wait_until(lambda: ready_with_limits(pools, limits, "keyless", 1), "keyless Ready", 120)


def test_a_deployment_the_api_server_rejects_is_named_and_a_fixed_spec_recovers(
    operator: OperatorProcess,
    namespace: str,
    node_group: str,
    pools: Pools,
    limits: PrefectLimits,
    prefect_server: LocalPrefectServer,
) -> None:
    # Valid for the CRD, invalid for the API server: a mount of a volume that does not exist.
    spec = pool_spec(prefect_server.api_url, node_group, "gpu4", {"perWorker": 1}, 1)
    template = spec["worker"]["podTemplate"]
    template["volumeMounts"] = [{"name": "models", "mountPath": "/models"}]
    pools.create("unmountable", spec)

    condition = assert_failure_is_visible(
        operator, pools, namespace, "unmountable", "DeploymentRejected"
    )
    # The API server's own words: the Deployment's field and what is wrong with it.
    assert "spec.template.spec.containers[0].volumeMounts[" in condition["message"]
    assert 'Not found: "models"' in condition["message"]
    with pytest.raises(client.ApiException) as info:
        pools.apps.read_namespaced_deployment("unmountable", namespace)
    assert info.value.status == 404

    pools.patch_spec(
        "unmountable",
        {"worker": {"podTemplate": {"volumes": [{"name": "models", "emptyDir": {}}]}}},
    )
    wait_until(lambda: ready_with_limits(pools, limits, "unmountable", 1), "unmountable Ready", 120)


def test_a_pool_deleted_while_prefect_is_down_waits_and_then_removes_its_limits(
    operator: OperatorProcess,
    namespace: str,
    node_group: str,
    pools: Pools,
    tmp_path: Path,
) -> None:
    server = LocalPrefectServer(home=tmp_path / "prefect", port=free_port()).start()
    try:
        own_limits = PrefectLimits(server.api_url)
        spec = pool_spec(server.api_url, node_group, "gpu8", {"perWorker": 1}, 2)
        pods = start_pool(pools, own_limits, "stranded", spec)

        server.stop()
        pools.delete("stranded")
        # The finalizer holds the pool while its limits cannot be deleted.
        wait_until(
            lambda: pools.get("stranded")["metadata"].get("deletionTimestamp"),
            "deletion to begin",
        )
        settle(10)
        held = pools.get("stranded")
        assert held["metadata"]["finalizers"], "the pool went with its limits still in Prefect"
        operator.assert_alive()

        server.start()
        wait_until(lambda: not pools.exists("stranded"), "the pool to go", timeout=120)
        for pod in pods:
            assert own_limits.get(f"gpu:{pod}") is None, f"limit of {pod} left behind"
        operator.assert_alive()
    finally:
        server.stop()


def test_a_deployment_budget_or_account_of_the_pools_made_by_someone_else_is_left_alone(
    operator: OperatorProcess,
    dev_cluster: DevCluster,
    namespace: str,
    node_group: str,
    pools: Pools,
    limits: PrefectLimits,
    prefect_server: LocalPrefectServer,
) -> None:
    """A tenant cannot make the operator take over, rewrite or (through the pool's
    deletion) garbage-collect an object it did not create: a name clash is named
    on the pool, and the object stays as its owner made it."""
    policy = client.PolicyV1Api(dev_cluster.api_client())
    theirs = {"app": "theirs"}
    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="clash"),
        spec=client.V1DeploymentSpec(
            replicas=0,
            selector=client.V1LabelSelector(match_labels=theirs),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=theirs),
                spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="theirs")]),
            ),
        ),
    )
    pools.apps.create_namespaced_deployment(namespace, deployment)
    for name in ("clash", "budgeted"):
        budget = client.V1PodDisruptionBudget(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1PodDisruptionBudgetSpec(
                max_unavailable=0, selector=client.V1LabelSelector(match_labels=theirs)
            ),
        )
        policy.create_namespaced_pod_disruption_budget(namespace, budget)

    pools.core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="account-worker"))
    )

    def as_dict(obj: object) -> dict[str, Any]:
        body: dict[str, Any] = policy.api_client.sanitize_for_serialization(obj)
        return body

    def untouched() -> None:
        found = as_dict(pools.apps.read_namespaced_deployment("clash", namespace))
        assert "ownerReferences" not in found["metadata"]
        assert found["spec"]["template"]["spec"]["containers"][0]["image"] == "theirs"
        for name in ("clash", "budgeted"):
            pdb = as_dict(policy.read_namespaced_pod_disruption_budget(name, namespace))
            assert "ownerReferences" not in pdb["metadata"]
            assert pdb["spec"]["maxUnavailable"] == 0
            assert pdb["spec"]["selector"] == {"matchLabels": theirs}
        account = as_dict(pools.core.read_namespaced_service_account("account-worker", namespace))
        assert "ownerReferences" not in account["metadata"]

    spec = pool_spec(prefect_server.api_url, node_group, "gpu4", {"perWorker": 1}, 1)
    pools.create("clash", spec)
    condition = assert_failure_is_visible(operator, pools, namespace, "clash", "DeploymentNotOwned")
    assert f"Deployment {namespace}/clash exists and is not this pool's" in condition["message"]
    assert "no controller" in condition["message"]

    pools.create("account", spec)
    condition = assert_failure_is_visible(
        operator, pools, namespace, "account", "ServiceAccountNotOwned"
    )
    assert f"ServiceAccount {namespace}/account-worker exists" in condition["message"]

    # A pool without spec.disruption leaves a budget of its name alone (it would
    # otherwise be turned off, 100%); one with spec.disruption is refused.
    pods = start_pool(pools, limits, "budgeted", spec)
    # Its workers run as its own account (no token), which the pool owns.
    for pod in pods:
        pod_spec = pools.core.read_namespaced_pod(pod, namespace).spec
        assert pod_spec is not None
        assert pod_spec.service_account_name == "budgeted-worker"
        assert pod_spec.automount_service_account_token is False
    own = as_dict(pools.core.read_namespaced_service_account("budgeted-worker", namespace))
    assert own["metadata"]["ownerReferences"][0]["name"] == "budgeted"
    pools.patch_spec("budgeted", {"disruption": {"maxUnavailable": 1}})
    condition = assert_failure_is_visible(
        operator, pools, namespace, "budgeted", "DisruptionBudgetNotOwned"
    )
    assert f"PodDisruptionBudget {namespace}/budgeted exists" in condition["message"]
    untouched()

    # The pools' deletion takes nothing of theirs with it.
    for name in ("clash", "budgeted", "account"):
        pools.delete(name)
    wait_until(
        lambda: not any(pools.exists(n) for n in ("clash", "budgeted", "account")), "pools gone"
    )
    settle(3)  # the garbage collector would act on an owner reference now
    untouched()
    operator.assert_alive()


def test_a_pool_whose_prefect_is_gone_for_good_is_let_go_after_its_finalizer_timeout(
    operator: OperatorProcess,
    namespace: str,
    node_group: str,
    pools: Pools,
    tmp_path: Path,
) -> None:
    """``kubectl delete namespace`` must not hang on a Prefect that never comes back:
    after ``spec.prefect.finalizerTimeoutSeconds`` the pool goes, and an Event
    names the limits it left in Prefect."""
    server = LocalPrefectServer(home=tmp_path / "prefect", port=free_port()).start()
    try:
        spec = pool_spec(server.api_url, node_group, "gpu8", {"perWorker": 1}, 1)
        spec["prefect"]["finalizerTimeoutSeconds"] = 5
        (pod,) = start_pool(pools, PrefectLimits(server.api_url), "abandoned", spec)
    finally:
        server.stop()
    pools.delete("abandoned")
    wait_until(lambda: not pools.exists("abandoned"), "the pool to go", timeout=60)
    left = wait_until(
        lambda: warned(pools, "abandoned", "LimitsLeftInPrefect"), "a LimitsLeftInPrefect Event"
    )
    assert f"gpu:{pod}" in left[0]
    assert "finalizerTimeoutSeconds=5" in left[0]
    operator.assert_alive()


def test_pods_the_namespace_refuses_are_named_on_the_pool_never_a_silent_zero(
    operator: OperatorProcess,
    dev_cluster: DevCluster,
    namespace: str,
    node_group: str,
    pools: Pools,
    limits: PrefectLimits,
    prefect_server: LocalPrefectServer,
) -> None:
    """The operator's pods pass Pod Security "restricted" as enforced by the API
    server; pods the namespace still refuses (here its quota) make the pool
    Degraded with the API server's own reason, until they are allowed."""
    dev_cluster.kubectl("label", "namespace", namespace,
                        "pod-security.kubernetes.io/enforce=restricted")  # fmt: skip
    spec = pool_spec(prefect_server.api_url, node_group, "gpu8", {"perWorker": 1}, 1)
    start_pool(pools, limits, "restricted", spec)  # Ready under "restricted"

    quota = client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="two-pods"),
        spec=client.V1ResourceQuotaSpec(hard={"pods": "2"}),
    )
    pools.core.create_namespaced_resource_quota(namespace, quota)
    pools.scale("restricted", 3)
    condition = wait_until(
        lambda: degraded_with(pools, "restricted", "WorkerPodsRejected"),
        "restricted Degraded (WorkerPodsRejected)",
        timeout=120,
    )
    assert "exceeded quota: two-pods" in condition["message"]
    assert '"restricted-' not in condition["message"]  # no pod name: the same at every retry
    pools.core.patch_namespaced_resource_quota(
        "two-pods", namespace, {"spec": {"hard": {"pods": "3"}}}
    )
    wait_until(lambda: ready_with_limits(pools, limits, "restricted", 3), "3 workers", 180)
    operator.assert_alive()
