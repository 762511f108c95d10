"""The tenant boundary, tried as a tenant: a GpuWorkerPool grants nothing beyond
what its namespace already allows, and no tenant can hurt the operator or another.

The tenant is a ServiceAccount of its own namespace that may only create
GpuWorkerPools and Secrets there (and read its pools' Events): its requests
carry its own token, so the API server's authorizer and admission judge them
as they would a real tenant's. Each escalation is tried and must be rejected
by the API server or neutralised by the operator, with the field or rule
named where the tenant looks. Meanwhile one operator serves both the abusive
tenant's namespace and another tenant's, and the other tenant's pool is timed
(a new worker's limit, before and during the abuse).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from k8s.cluster import DevCluster
from k8s.operator_harness import (
    TEST_TAINT_KEYS,
    OperatorProcess,
    Pools,
    PrefectLimits,
    degraded_with,
    pool_spec,
    pool_text,
    start_pool,
    wait_until,
)
from kubernetes import client
from recording_server import RecordingServer

from prefect_gpu_workers.server import LocalPrefectServer, free_port

from builders import POD_ESCALATIONS

TENANT = "tenant"  # the ServiceAccount a tenant acts as
TENANT_RULES = [
    {"apiGroups": ["gpuworkers.dev"], "resources": ["gpuworkerpools"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list"]},
]  # fmt: skip


@dataclass
class Tenants:
    abuser: str  # namespace of the tenant who tries everything
    other: str  # namespace of a tenant who only runs a pool
    abuser_pools: Pools  # acting with the abusive tenant's own token
    admin_view: Pools  # the admin's view of the abuser's namespace (what really exists)


def _namespace(cluster: DevCluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(name)
    return name


@pytest.fixture(scope="module")
def tenants(dev_cluster: DevCluster, node_group: str) -> Iterator[Tenants]:
    abuser, other = _namespace(dev_cluster, "tenant-a"), _namespace(dev_cluster, "tenant-b")
    rbac = client.RbacAuthorizationV1Api(dev_cluster.api_client())
    core = client.CoreV1Api(dev_cluster.api_client())
    core.create_namespaced_service_account(
        abuser, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=TENANT))
    )
    rules = [client.V1PolicyRule(api_groups=r["apiGroups"], resources=r["resources"],
                                 verbs=r["verbs"]) for r in TENANT_RULES]  # fmt: skip
    meta = client.V1ObjectMeta(name=TENANT)
    rbac.create_namespaced_role(abuser, client.V1Role(metadata=meta, rules=rules))
    binding = client.V1RoleBinding(
        metadata=meta,
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=TENANT),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name=TENANT, namespace=abuser)],
    )
    rbac.create_namespaced_role_binding(abuser, binding)
    token = dev_cluster.kubectl("-n", abuser, "create", "token", TENANT, "--duration=30m")
    as_tenant = dev_cluster.api_client(token.stdout.strip())
    yield Tenants(abuser, other, Pools(dev_cluster, abuser, as_tenant), Pools(dev_cluster, abuser))
    dev_cluster.delete_namespaces(abuser, other)


@pytest.fixture(scope="module")
def other_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPrefectServer]:
    """The other tenant's Prefect server: the abuser may not send the operator there."""
    home = tmp_path_factory.mktemp("other-prefect")
    server = LocalPrefectServer(home=home, port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def internal_service() -> Iterator[RecordingServer]:
    """Something on the operator's network that no tenant may reach through it."""
    with RecordingServer(200, "{}").running() as server:
        yield server


@pytest.fixture(scope="module")
def operator(
    dev_cluster: DevCluster,
    tenants: Tenants,
    other_prefect: LocalPrefectServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """One operator for both namespaces; each may name only its own Prefect."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    args = (
        "--namespace", tenants.other,
        f"--allowed-api-url={tenants.other}={other_prefect.api_url}",
        f"--allowed-api-url={tenants.abuser}={own_url(tenants)}",
        *(f"--allowed-toleration-key={key}" for key in TEST_TAINT_KEYS),
    )  # fmt: skip
    proc = OperatorProcess(
        dev_cluster.kubeconfig, tenants.abuser, log, metrics_port=free_port(), extra_args=args
    ).start()
    yield proc
    proc.stop()
    print(f"--- operator log ---\n{proc.log_tail(80)}")


def own_url(tenants: Tenants) -> str:
    """The abusive tenant's own Prefect, as the admin allowed it (nothing answers there:
    the pools of these tests fail before any request)."""
    return f"https://prefect.{tenants.abuser}.svc/api"


def abusive_spec(tenants: Tenants, node_group: str, **changes: Any) -> dict[str, Any]:
    spec = pool_spec(own_url(tenants), node_group, "gpu8", {"perWorker": 1}, 1)
    spec.update(changes)
    return spec


def template_spec(tenants: Tenants, node_group: str, template: dict[str, Any]) -> dict[str, Any]:
    spec = abusive_spec(tenants, node_group)
    spec["worker"]["podTemplate"].update(template)
    return spec


def new_worker_latency(pools: Pools, limits: PrefectLimits, pool: str, replicas: int) -> float:
    """Scale the pool to ``replicas``; seconds until the new worker's limit exists."""
    before = set(pools.running_pods(pool))
    started = time.monotonic()
    pools.scale(pool, replicas)

    def new_limit() -> bool:
        new = set(pools.running_pods(pool)) - before
        return bool(new) and all(limits.get(f"gpu:{pod}") is not None for pod in new)

    wait_until(new_limit, f"{pool}'s new worker and its limit", timeout=120, interval=0.1)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def victim(
    dev_cluster: DevCluster,
    tenants: Tenants,
    operator: OperatorProcess,
    other_prefect: LocalPrefectServer,
    node_group: str,
) -> tuple[Pools, PrefectLimits]:
    """The other tenant's pool, Ready before any abuse."""
    pools, limits = Pools(dev_cluster, tenants.other), PrefectLimits(other_prefect.api_url)
    spec = pool_spec(other_prefect.api_url, node_group, "gpu8", {"perWorker": 1}, 1)
    start_pool(pools, limits, "steady", spec)
    return pools, limits


FIXED = [e for e in POD_ESCALATIONS if e.crd is not None]
ADMIN_LISTED = [e for e in POD_ESCALATIONS if e.crd is None]


@pytest.mark.parametrize("escalation", FIXED, ids=[e.name for e in FIXED])
def test_the_api_server_refuses_the_tenant_a_pod_that_restricted_forbids(
    tenants: Tenants, node_group: str, escalation: Any
) -> None:
    with pytest.raises(client.ApiException) as info:
        tenants.abuser_pools.create(
            "escalate", template_spec(tenants, node_group, escalation.template)
        )
    assert info.value.status == 422, info.value.body
    assert escalation.crd in str(info.value.body)


def test_a_budget_that_blocks_node_drains_is_refused(tenants: Tenants, node_group: str) -> None:
    spec = abusive_spec(tenants, node_group, disruption={"maxUnavailable": 0})
    with pytest.raises(client.ApiException) as info:
        tenants.abuser_pools.create("undrainable", spec)
    assert info.value.status == 422
    assert "spec.disruption.maxUnavailable" in str(info.value.body)


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://2130706433:4200/api", "four decimal numbers"),
        ("http://0x7f.1:4200/api", "four decimal numbers"),
        ("http://[::ffff:a00:1]:4200/api", "not inside an IPv6 one"),
        ("http://169.254.169.254/latest", "link-local"),
    ],
)
def test_the_api_server_refuses_other_spellings_of_an_address_and_link_local_ones(
    tenants: Tenants, node_group: str, url: str, rule: str
) -> None:
    """What could reach an internal address past a reader or an allowlist, or the
    cloud's metadata service, never gets as far as the operator."""
    spec = abusive_spec(tenants, node_group)
    spec["prefect"]["apiUrl"] = url
    with pytest.raises(client.ApiException) as info:
        tenants.abuser_pools.create("spelled", spec)
    assert info.value.status == 422
    assert "spec.prefect.apiUrl" in str(info.value.body)
    assert rule in str(info.value.body)


def test_the_tenant_cannot_make_or_touch_what_a_pool_makes(
    dev_cluster: DevCluster, tenants: Tenants
) -> None:
    """The tenant's own rights end at pools and Secrets: what the operator makes for
    it (Deployments, pods, budgets) it cannot create or change itself."""
    for resource in ("deployments.apps", "pods", "poddisruptionbudgets.policy", "roles"):
        for verb in ("create", "patch"):
            can = dev_cluster.kubectl(
                "auth", "can-i", verb, resource, "-n", tenants.abuser,
                f"--as=system:serviceaccount:{tenants.abuser}:{TENANT}", check=False,
            )  # fmt: skip
            assert can.stdout.strip() == "no", f"the tenant may {verb} {resource}"


def test_what_the_tenant_gets_past_admission_the_operator_neutralises(
    tenants: Tenants,
    operator: OperatorProcess,
    victim: tuple[Pools, PrefectLimits],
    other_prefect: LocalPrefectServer,
    internal_service: RecordingServer,
    node_group: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each escalation the API server admits (an admin's list, another tenant's or an
    internal URL, a foreign object's name) leaves the pool Degraded with the field
    or rule named, makes no pod and sends no request; the operator stays up and the
    other tenant's new workers get their limits as fast as before."""
    victim_pools, victim_limits = victim
    before = [new_worker_latency(victim_pools, victim_limits, "steady", n) for n in (2, 3)]

    admin = tenants.admin_view
    theirs = {"app": "theirs"}
    admin.apps.create_namespaced_deployment(tenants.abuser, client.V1Deployment(
        metadata=client.V1ObjectMeta(name="clash"),
        spec=client.V1DeploymentSpec(
            replicas=0, selector=client.V1LabelSelector(match_labels=theirs),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=theirs),
                spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="x")]),
            ),
        ),
    ))  # fmt: skip

    # (pool name, spec, reason, words of the message)
    tries: list[tuple[str, dict[str, Any], str, str]] = [
        (
            f"admin-{i}",
            template_spec(tenants, node_group, e.template),
            "PodTemplateNotAllowed",
            e.field,
        )
        for i, e in enumerate(ADMIN_LISTED)
    ]
    long_grace = abusive_spec(tenants, node_group)
    long_grace["worker"]["drainGracePeriodSeconds"] = 86400
    tries.append(("long-grace", long_grace, "PodTemplateNotAllowed",
                  "spec.worker.drainGracePeriodSeconds"))  # fmt: skip
    # Valid URLs, but not the abuser's to name (the spellings that are not valid
    # are refused at admission: test_the_api_server_refuses_other_spellings_...).
    urls = {"other-tenant": other_prefect.api_url, "internal": f"{internal_service.url}/api"}
    for name, url in urls.items():
        spec = abusive_spec(tenants, node_group)
        spec["prefect"]["apiUrl"] = url
        tries.append((name, spec, "ApiUrlNotAllowed", "spec.prefect.apiUrl"))
    tries.append(
        ("clash", abusive_spec(tenants, node_group), "DeploymentNotOwned", "is not this pool's")
    )
    for name, spec, _, _ in tries:
        tenants.abuser_pools.create(name, spec)

    during = [new_worker_latency(victim_pools, victim_limits, "steady", n) for n in (4, 5)]
    for name, _, reason, words in tries:
        condition = wait_until(
            lambda name=name, reason=reason: degraded_with(tenants.abuser_pools, name, reason),
            f"{name} Degraded ({reason})",
        )
        assert words in condition["message"], pool_text(tenants.abuser_pools, name)
        assert not admin.pods(name), f"{name} made pods"
    # The clash: the other owner's Deployment is as they made it.
    clash = admin.apps.read_namespaced_deployment("clash", tenants.abuser)
    assert clash.metadata is not None
    assert clash.metadata.owner_references is None
    assert internal_service.hits == [], "a request reached the internal service"
    operator.assert_alive()
    for name, *_ in tries:  # nothing in Prefect: their finalizers let them go at once
        tenants.abuser_pools.delete(name)
    victim_pools.delete("steady")
    wait_until(
        lambda: (
            not any(admin.exists(name) for name, *_ in tries) and not victim_pools.exists("steady")
        ),
        "every pool of this test to go",
    )
    with capsys.disabled():
        print(
            f"\nother tenant's new worker -> limit, s: before abuse {before[0]:.2f}, "
            f"{before[1]:.2f}; during ({len(tries)} abusive pools) {during[0]:.2f}, {during[1]:.2f}"
        )
