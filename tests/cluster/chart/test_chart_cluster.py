"""The chart on a real control plane (hack/dev-cluster): dry runs, install, RBAC, uninstall.

The operator pod the chart creates runs on a kwok node, so it never really
runs. The operator runs here instead, as a subprocess, authenticated as the
chart's ServiceAccount (a token from ``kubectl create token``), so every API
call it makes is judged by the chart's RBAC. Pods of worker pools run on kwok
nodes too: what is checked is the worker Deployment and the per-pod limits in
a real Prefect server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from k8s.cluster import DevCluster, wait_for
from k8s.operator_harness import (
    PrefectLimits,
    denied_api_calls,
    install_crd,
    parse_metrics,
    unique,
    wait_established,
)
from k8s.real_node import TAINT_KEY, Image, RealNode
from kubernetes import client

from prefect_gpu_workers.server import LocalPrefectServer

from .conftest import ANY_API_URL, CHART, Helm, by_kind, parse_manifests
from .test_chart_render import VALUE_SETS
from builders import pool_manifest, pool_spec_dict

pytestmark = pytest.mark.cluster

HERE = Path(__file__).resolve().parent
PROMETHEUS_OPERATOR_STUBS = HERE / "prometheus-operator-crd-stubs.yaml"
GROUP = "gpuworkers.dev"
CRD_NAME = f"gpuworkerpools.{GROUP}"
POOL_LABEL = "gpuworkers.dev/pool"
API_KEY_SECRET = "prefect-api-key"
OTHER_SECRET = "unrelated-secret"


def get_json(cluster: DevCluster, *args: str) -> dict[str, Any] | None:
    """``kubectl get ... -o json``; None when it does not exist."""
    proc = cluster.kubectl("get", *args, "-o", "json", "--ignore-not-found", check=False)
    assert proc.returncode == 0, proc.stderr
    if not proc.stdout.strip():
        return None
    found: dict[str, Any] = json.loads(proc.stdout)
    return found


def list_items(cluster: DevCluster, *args: str) -> list[dict[str, Any]]:
    """Items of ``kubectl get KINDS ... -o json`` (a list, possibly empty)."""
    items: list[dict[str, Any]] = cluster.kubectl_json("get", *args)["items"]
    return items


# --- dry runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_operator_crds(dev_cluster: DevCluster) -> Iterator[None]:
    """The Prometheus Operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs
    (typed subsets, see the stubs), each unless it is there already."""
    stubs = [doc for doc in yaml.safe_load_all(PROMETHEUS_OPERATOR_STUBS.read_text()) if doc]
    installed = []
    for stub in stubs:
        name = stub["metadata"]["name"]
        if get_json(dev_cluster, "crd", name) is None:
            dev_cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(stub))
            wait_established(dev_cluster, name)
            installed.append(name)
    yield
    for name in installed:
        dev_cluster.kubectl("delete", "crd", name, "--ignore-not-found")


@pytest.fixture(scope="module")
def gpuworkerpool_crd(dev_cluster: DevCluster) -> None:
    """The CRD, installed for real: a server dry run of a pool needs its kind to exist
    (the CRD in the same dry-run apply is not created). On a fresh cluster these
    tests run before anything else has installed it."""
    install_crd(dev_cluster)


@pytest.mark.usefixtures("prometheus_operator_crds", "gpuworkerpool_crd")
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_chart_passes_server_side_dry_run(
    dev_cluster: DevCluster, helm: Helm, tmp_path: Path, name: str
) -> None:
    """What helm renders (CRDs included) is accepted by the API server as is."""
    release_ns = unique("pgw-dry")
    values = json.loads(json.dumps(VALUE_SETS[name]))
    # Roles land in the watched namespaces: those must exist, and be this test's.
    watched = [unique(ns) for ns in values.get("watchNamespaces", [])]
    if watched:
        values["watchNamespaces"] = watched
    for ns in (release_ns, *watched):
        dev_cluster.create_namespace(ns)
    try:
        rendered = helm.render(
            values, release="dry", namespace=release_ns, include_crds=True, tmp_dir=tmp_path
        )
        manifests = parse_manifests(rendered)
        proc = dev_cluster.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "--field-manager=pgw-chart-test",
            "-f",
            "-",
            input=rendered,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        applied = [line for line in proc.stdout.splitlines() if "(server dry run)" in line]
        assert len(applied) == len(manifests), proc.stdout
        for kind in ("CustomResourceDefinition", "Deployment", "ServiceAccount"):
            assert by_kind(manifests, kind)
        if name == "sample-pool":
            assert any(line.startswith("gpuworkerpool.gpuworkers.dev/") for line in applied)
        if name == "metrics-servicemonitor":
            assert any(line.startswith("servicemonitor.monitoring.coreos.com/") for line in applied)
        if name == "monitoring":
            for kind in ("podmonitor", "prometheusrule"):
                assert any(line.startswith(f"{kind}.monitoring.coreos.com/") for line in applied)
            assert any(line.startswith("configmap/") for line in applied)
    finally:
        dev_cluster.delete_namespaces(release_ns, *watched)


@pytest.mark.usefixtures("gpuworkerpool_crd")
def test_api_server_rejects_a_sample_pool_the_crd_forbids(
    dev_cluster: DevCluster, helm: Helm, tmp_path: Path
) -> None:
    """The dry runs are real validation: the CRD's CEL rule turns down a bad pool."""
    ns = unique("pgw-dry")
    dev_cluster.create_namespace(ns)
    try:
        values = json.loads(json.dumps(VALUE_SETS["sample-pool"]))
        # Passes the chart's schema (perWorker given), then also ask for the whole node.
        rendered = helm.render(values, release="dry", namespace=ns, tmp_dir=tmp_path)
        pool = next(m for m in parse_manifests(rendered) if m["kind"] == "GpuWorkerPool")
        pool["spec"]["gpu"]["wholeNode"] = True
        proc = dev_cluster.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=json.dumps(pool), check=False
        )
        assert proc.returncode != 0
        assert "set exactly one of spec.gpu.perWorker" in proc.stderr
    finally:
        dev_cluster.delete_namespaces(ns)


# --- one release, watching one namespace --------------------------------------------------


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    pools_namespace: str

    @property
    def fullname(self) -> str:
        return f"{self.name}-prefect-gpu-workers"

    @property
    def lease(self) -> str:
        return f"{self.fullname}-leader"

    @property
    def service_account(self) -> str:
        return self.fullname

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def uninstall_leftovers(cluster: DevCluster, release: Release) -> None:
    """Pools still there after a failed test: let them go without an operator."""
    for pool in list_items(cluster, "gwp", "-n", release.pools_namespace):
        cluster.kubectl(
            "-n",
            release.pools_namespace,
            "patch",
            "gwp",
            pool["metadata"]["name"],
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
            check=False,
        )


@pytest.fixture(scope="module")
def release(
    dev_cluster: DevCluster,
    cluster_helm: Helm,
    real_node: RealNode,
    project_images: dict[str, Image],
) -> Iterator[Release]:
    """``helm install`` watching one namespace, with the API key Secret scoped in.

    The operator image built here runs on the dev cluster's real node: the
    chart's pod, its probes and its ServiceAccount token are the real thing.
    """
    repository, tag = project_images["operator"].ref.rsplit(":", 1)
    rel = Release(unique("pgw"), unique("pgw-chart"), unique("pgw-pools"))
    dev_cluster.create_namespace(rel.namespace)
    dev_cluster.create_namespace(rel.pools_namespace)
    for secret in (API_KEY_SECRET, OTHER_SECRET):
        dev_cluster.kubectl(
            "-n",
            rel.pools_namespace,
            "create",
            "secret",
            "generic",
            secret,
            "--from-literal=api-key=not-checked-by-a-local-prefect",
        )
    try:
        cluster_helm(
            "install",
            rel.name,
            str(CHART),
            "--namespace",
            rel.namespace,
            "--set",
            f"watchNamespaces={{{rel.pools_namespace}}}",
            "--set",
            f"prefect.apiKeySecret.name={API_KEY_SECRET}",
            "--set",
            ANY_API_URL,
            "--set-json",  # pools may tolerate the real node's taint (and the GPU one)
            f"pools.allowedTolerationKeys={json.dumps([TAINT_KEY, 'nvidia.com/gpu'])}",
            "--set",
            f"image.repository={repository}",
            "--set",
            f"image.tag={tag}",
            "--set",
            "image.pullPolicy=Never",  # imported into the node; no registry
            "--set",
            "logFormat=json",  # one record per line (denied_api_calls reads them)
            "--set",
            "metrics.enabled=true",
            "--set-json",
            f"nodeSelector={json.dumps(real_node.placement()['nodeSelector'])}",
            "--set-json",
            f"tolerations={json.dumps(real_node.placement()['tolerations'])}",
            "--wait",
            "--timeout=180s",
        )
        yield rel
    finally:
        uninstall_leftovers(dev_cluster, rel)
        cluster_helm(
            "uninstall", rel.name, "--namespace", rel.namespace, "--ignore-not-found", check=False
        )
        dev_cluster.delete_namespaces(rel.namespace, rel.pools_namespace)


def test_helm_install_creates_the_operator_and_its_rbac(
    dev_cluster: DevCluster, cluster_helm: Helm, release: Release
) -> None:
    status = json.loads(
        cluster_helm("status", release.name, "-n", release.namespace, "-o", "json").stdout
    )
    assert status["info"]["status"] == "deployed"
    notes = cluster_helm("get", "notes", release.name, "-n", release.namespace).stdout
    assert f"rollout status deployment/{release.fullname}" in notes
    assert f"the namespaces {release.pools_namespace}" in notes
    assert "kubectl delete gwp --all -A" in notes

    deployment = get_json(dev_cluster, "deployment", release.fullname, "-n", release.namespace)
    assert deployment is not None
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    # A leader and a hot standby, both on the real node, probes passing.
    assert deployment["status"].get("readyReplicas") == 2
    pods = {p["metadata"]["name"] for p in release_pods(dev_cluster, release)}
    assert wait_for(lambda: lease_holder(dev_cluster, release) in pods, timeout=60,
                    what="one of the operator's pods holding the Lease")  # fmt: skip
    for kind in ("role", "rolebinding"):
        assert get_json(dev_cluster, kind, f"{release.fullname}-leader-election",
                        "-n", release.namespace)  # fmt: skip
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--namespace={release.pools_namespace}" in args
    assert get_json(dev_cluster, "sa", release.service_account, "-n", release.namespace)
    for kind in ("role", "rolebinding"):
        assert get_json(dev_cluster, kind, release.fullname, "-n", release.pools_namespace)
    cluster_name = f"{release.namespace}-{release.fullname}"
    assert get_json(dev_cluster, "clusterrole", f"{cluster_name}-read")
    assert get_json(dev_cluster, "clusterrolebinding", f"{cluster_name}-read")
    # Watching one namespace: no cluster-wide grants beyond node and CRD reads.
    assert get_json(dev_cluster, "clusterrole", cluster_name) is None
    crd = get_json(dev_cluster, "crd", CRD_NAME)
    assert crd is not None
    established = [c for c in crd["status"]["conditions"] if c["type"] == "Established"]
    assert established[0]["status"] == "True"


def can_i(cluster: DevCluster, user: str, verb: str, what: str, namespace: str | None) -> bool:
    ns = ["-n", namespace] if namespace else []
    proc = cluster.kubectl("auth", "can-i", verb, what, f"--as={user}", *ns, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def test_service_account_may_do_what_the_operator_does_and_nothing_more(
    dev_cluster: DevCluster, release: Release
) -> None:
    pools, own = release.pools_namespace, release.namespace
    lease = f"leases.coordination.k8s.io/{release.lease}"
    allowed = [
        ("get", f"secrets/{API_KEY_SECRET}", pools),
        ("get", lease, own),  # leader election, its one Lease
        ("update", lease, own),
        ("create", "leases.coordination.k8s.io", own),  # create cannot name its object
        ("create", "gpuworkerlimits.gpuworkers.dev", pools),  # its records of the limits
        ("patch", "gpuworkerlimits.gpuworkers.dev", pools),
        ("delete", "gpuworkerlimits.gpuworkers.dev", pools),
        ("watch", "gpuworkerlimits.gpuworkers.dev", pools),
        ("list", "gpuworkerpools.gpuworkers.dev", pools),
        ("watch", "gpuworkerpools.gpuworkers.dev", pools),
        ("patch", "gpuworkerpools.gpuworkers.dev", pools),
        ("patch", "gpuworkerpools.gpuworkers.dev/status", pools),
        ("patch", "gpuworkerpools.gpuworkers.dev/scale", pools),  # spec.autoscaling
        ("get", "poddisruptionbudgets.policy", pools),  # whose is it
        ("create", "poddisruptionbudgets.policy", pools),  # spec.disruption
        ("patch", "poddisruptionbudgets.policy", pools),
        ("create", "deployments.apps", pools),
        ("patch", "deployments.apps", pools),
        ("watch", "pods", pools),
        ("patch", "pods", pools),  # the pod-deletion-cost annotation
        ("create", "events", pools),
        ("create", "serviceaccounts", pools),  # each pool's workers' own
        ("patch", "serviceaccounts", pools),
        ("list", "nodes", None),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io", None),
        ("watch", "namespaces", None),
    ]
    denied = [
        ("get", "leases.coordination.k8s.io/kube-scheduler", own),  # no other Lease
        ("update", "leases.coordination.k8s.io/another", own),
        ("delete", lease, own),
        ("list", "leases.coordination.k8s.io", own),
        ("create", "leases.coordination.k8s.io", pools),  # in its own namespace only
        ("update", "gpuworkerlimits.gpuworkers.dev", pools),
        ("delete", "gpuworkerlimits.gpuworkers.dev", own),  # not a watched namespace
        ("get", f"secrets/{OTHER_SECRET}", pools),  # only the Secret it is given
        ("list", "secrets", pools),
        ("get", f"secrets/{API_KEY_SECRET}", own),  # only in watched namespaces
        ("delete", "pods", pools),
        ("create", "pods", pools),
        ("delete", "deployments.apps", pools),
        ("update", "deployments.apps", pools),
        ("delete", "gpuworkerpools.gpuworkers.dev", pools),
        ("create", "gpuworkerpools.gpuworkers.dev", pools),
        ("get", "configmaps", pools),
        ("create", "configmaps", pools),
        ("create", "statefulsets.apps", pools),
        ("list", "statefulsets.apps", pools),
        ("create", "jobs.batch", pools),
        ("list", "gpuworkerpools.gpuworkers.dev", own),  # not a watched namespace
        ("list", "pods", own),
        ("update", "gpuworkerpools.gpuworkers.dev/scale", pools),
        ("delete", "poddisruptionbudgets.policy", pools),
        ("patch", "poddisruptionbudgets.policy", own),
        ("list", "poddisruptionbudgets.policy", pools),  # applied, never watched
        ("create", "pods/eviction", pools),
        ("list", "gpuworkerpools.gpuworkers.dev", "default"),
        ("patch", "nodes", None),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io", None),
        ("create", "rolebindings.rbac.authorization.k8s.io", pools),
        ("impersonate", "serviceaccounts", pools),
    ]
    wrong = [
        (verb, what, ns, expected)
        for expected, checks in ((True, allowed), (False, denied))
        for verb, what, ns in checks
        if can_i(dev_cluster, release.user, verb, what, ns) != expected
    ]
    assert not wrong, f"kubectl auth can-i disagrees (verb, resource, namespace, expected): {wrong}"


# --- the operator as the chart's ServiceAccount ------------------------------------------


def running_pods(cluster: DevCluster, namespace: str, pool: str) -> set[str]:
    return {
        p["metadata"]["name"]
        for p in list_items(cluster, "pods", "-n", namespace, "-l", f"{POOL_LABEL}={pool}")
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    }


def chart_test_pool(name: str, api_url: str, replicas: int) -> dict[str, Any]:
    spec = pool_spec_dict(
        replicas=replicas,
        workPool={"name": f"chart-test-{name}"},
        prefect={"apiUrl": api_url, "apiKeySecretRef": {"name": API_KEY_SECRET, "key": "api-key"}},
        worker={
            "image": "example.invalid/prefect-gpu-workers-worker:0.1.0",
            "limitWaitTimeoutSeconds": 60,
            "drainGracePeriodSeconds": 0,
        },
    )
    return pool_manifest(
        name,
        spec,
        # As Argo CD marks what it manages: the children must not copy these.
        labels={"app.kubernetes.io/instance": "argocd-app"},
        annotations={
            "argocd.argoproj.io/tracking-id": f"argocd-app:{GROUP}/GpuWorkerPool:ns/{name}"
        },
    )


@dataclass(frozen=True)
class OperatorPod:
    """The chart's operator pod on the real node, as the test sees it from outside."""

    cluster: DevCluster
    namespace: str
    name: str
    ip: str

    def log(self) -> str:
        return self.cluster.kubectl("logs", self.name, "-n", self.namespace).stdout

    def status(self) -> dict[str, Any]:
        pod = get_json(self.cluster, "pod", self.name, "-n", self.namespace) or {}
        statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
        status: dict[str, Any] = statuses[0]
        return status

    def metrics(self, port: int) -> dict[str, float]:
        response = httpx.get(f"http://{self.ip}:{port}/metrics", timeout=5)
        response.raise_for_status()
        return parse_metrics(response.text)


def release_pods(cluster: DevCluster, release: Release) -> list[dict[str, Any]]:
    return list_items(
        cluster, "pods", "-n", release.namespace,
        "-l", f"app.kubernetes.io/instance={release.name}",
    )  # fmt: skip


def lease_holder(cluster: DevCluster, release: Release) -> str | None:
    lease = get_json(cluster, "lease", release.lease, "-n", release.namespace) or {}
    holder = (lease.get("spec") or {}).get("holderIdentity")
    return str(holder) if holder else None


def operator_pod(cluster: DevCluster, release: Release) -> OperatorPod:
    """The leading replica (the Lease's holder): the one that acts."""
    holder = wait_for(lambda: lease_holder(cluster, release), timeout=60, what="the Lease's holder")
    (pod,) = [p for p in release_pods(cluster, release) if p["metadata"]["name"] == holder]
    return OperatorPod(cluster, release.namespace, pod["metadata"]["name"], pod["status"]["podIP"])


def test_the_chart_s_admission_policy_refuses_a_pool_outside_the_admin_s_lists(
    dev_cluster: DevCluster, release: Release
) -> None:
    """What the CRD cannot know (the admin's lists, chart values ``pools.*``) is
    refused at admission too, naming the field; the operator checks it again."""
    custom = client.CustomObjectsApi(dev_cluster.api_client())
    cases = {
        "serviceAccountName": {"serviceAccountName": "deployer"},
        "priorityClassName": {"priorityClassName": "system-node-critical"},
        "tolerations": {"tolerations": [{"operator": "Exists"}]},
    }
    for field, template in cases.items():
        spec = pool_spec_dict(worker={"image": "i", "podTemplate": template})
        with pytest.raises(client.ApiException) as info:
            custom.create_namespaced_custom_object(
                "gpuworkers.dev", "v1alpha1", release.pools_namespace, "gpuworkerpools",
                pool_manifest("refused", spec, release.pools_namespace), dry_run="All",
            )  # fmt: skip
        assert info.value.status in (403, 422), info.value.body
        assert f"spec.worker.podTemplate.{field}" in str(info.value.body)
        assert "ValidatingAdmissionPolicy" in str(info.value.body)
    long_grace = pool_spec_dict(worker={"image": "i", "drainGracePeriodSeconds": 7200})
    with pytest.raises(client.ApiException) as info:
        custom.create_namespaced_custom_object(
            "gpuworkers.dev", "v1alpha1", release.pools_namespace, "gpuworkerpools",
            pool_manifest("refused", long_grace, release.pools_namespace), dry_run="All",
        )  # fmt: skip
    assert "spec.worker.drainGracePeriodSeconds must be at most 3600" in str(info.value.body)
    # The real node's taint is on the release's list: admitted.
    allowed = pool_spec_dict(worker={"image": "i", "podTemplate": {
        "tolerations": [{"key": TAINT_KEY, "operator": "Exists"}]}})  # fmt: skip
    custom.create_namespaced_custom_object(
        "gpuworkers.dev", "v1alpha1", release.pools_namespace, "gpuworkerpools",
        pool_manifest("admitted", allowed, release.pools_namespace), dry_run="All",
    )  # fmt: skip


def test_the_operator_s_account_may_change_only_pools_objects_and_the_deletion_cost(
    dev_cluster: DevCluster, release: Release
) -> None:
    """RBAC lets the operator patch any pod and apply any Deployment in a watched
    namespace; the chart's operator admission policy narrows that to what it does:
    a pool's pods, in their deletion-cost annotation only, and pools' objects."""
    ns = release.pools_namespace
    token = dev_cluster.kubectl(
        "-n", release.namespace, "create", "token", release.service_account, "--duration=10m"
    ).stdout.strip()
    as_operator = dev_cluster.api_client(token)
    core, apps = client.CoreV1Api(as_operator), client.AppsV1Api(as_operator)
    admin = client.CoreV1Api(dev_cluster.api_client())
    pods = {"of-a-pool": {"gpuworkers.dev/pool": "p"}, "not-a-pools": {"app": "theirs"}}
    for name, labels in pods.items():  # never scheduled: no node has the label
        admin.create_namespaced_pod(ns, client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, labels=labels),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="x")],
                                  node_selector={"pgw-test/nowhere": "true"}),
        ))  # fmt: skip
    try:
        cost = {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "5"}}}
        core.patch_namespaced_pod("of-a-pool", ns, cost)  # what it does: allowed
        only_cost, pools_only = "deletion-cost annotation", "of a GpuWorkerPool"
        refused: list[tuple[str, dict[str, Any], str]] = [
            ("not-a-pools", cost, pools_only),
            ("of-a-pool", {"metadata": {"labels": {"gpuworkers.dev/pool": "q"}}}, pools_only),
            ("of-a-pool", {"metadata": {"labels": {"extra": "x"}}}, only_cost),
            ("of-a-pool", {"metadata": {"annotations": {"other": "x"}}}, only_cost),
            ("of-a-pool", {"spec": {"activeDeadlineSeconds": 1}}, only_cost),
        ]
        for name, patch, words in refused:
            with pytest.raises(client.ApiException) as info:
                core.patch_namespaced_pod(name, ns, patch)
            assert info.value.status == 403, (patch, info.value.body)
            assert words in str(info.value.body), info.value.body
        foreign = client.V1Deployment(
            metadata=client.V1ObjectMeta(name="not-a-pools"),
            spec=client.V1DeploymentSpec(
                selector=client.V1LabelSelector(match_labels={"app": "theirs"}),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels={"app": "theirs"}),
                    spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="x")]),
                ),
            ),
        )
        with pytest.raises(client.ApiException) as info:
            apps.create_namespaced_deployment(ns, foreign, dry_run="All")
        assert info.value.status == 403
        assert "of a GpuWorkerPool" in str(info.value.body)
        # A worker's limit record too: only a pool's (RBAC lets it create any).
        records = client.CustomObjectsApi(as_operator)
        record: dict[str, Any] = {
            "apiVersion": "gpuworkers.dev/v1alpha1", "kind": "GpuWorkerLimit",
            "metadata": {"name": "not-a-pools"},
            "spec": {"pool": "p", "pod": "not-a-pools", "restarts": 0, "limits": []},
        }  # fmt: skip
        with pytest.raises(client.ApiException) as info:
            records.create_namespaced_custom_object(
                "gpuworkers.dev", "v1alpha1", ns, "gpuworkerlimits", record, dry_run="All"
            )
        assert info.value.status == 403, info.value.body
        assert "of a GpuWorkerPool" in str(info.value.body)
        record["metadata"]["labels"] = {"gpuworkers.dev/pool": "p"}
        records.create_namespaced_custom_object(
            "gpuworkers.dev", "v1alpha1", ns, "gpuworkerlimits", record, dry_run="All"
        )
    finally:
        for name in pods:
            admin.delete_namespaced_pod(name, ns, grace_period_seconds=0)


def test_the_chart_s_operator_pod_creates_scales_and_deletes_a_pool(
    dev_cluster: DevCluster,
    release: Release,
    real_node: RealNode,
    node_prefect_server: LocalPrefectServer,
) -> None:
    ns, pool, api = release.pools_namespace, unique("pool"), node_prefect_server.api_url
    operator = operator_pod(dev_cluster, release)
    started = operator.status()
    # The chart's pod on the real node: started from the image built here, its
    # probes (kopf's /healthz) passing, as the chart's uid, never restarted.
    assert started["ready"] is True
    assert started["image"].endswith(release_image_tag(dev_cluster, release))
    pod = get_json(dev_cluster, "pod", operator.name, "-n", release.namespace) or {}
    assert pod["spec"]["nodeName"] == real_node.name
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert pod["spec"]["securityContext"]["runAsUser"] == values["podSecurityContext"]["runAsUser"]

    def wait(probe: Callable[[], Any], what: str, timeout: float = 120) -> Any:
        def checked() -> Any:
            restarts = operator.status().get("restartCount")
            assert restarts == 0, f"operator restarted:\n{operator.log()[-4000:]}"
            return probe()

        try:
            return wait_for(checked, timeout=timeout, interval=0.5, what=what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; operator log tail:\n{operator.log()[-4000:]}") from exc

    def limits_of(pods: set[str]) -> bool:
        return all((lim := PrefectLimits(api).get(f"gpu:{p}")) and lim["limit"] == 1 for p in pods)

    def workers(count: int) -> set[str]:
        """Wait for ``count`` running pods with their limits; return the pod names."""

        def exactly() -> set[str] | None:
            pods = running_pods(dev_cluster, ns, pool)
            return pods if len(pods) == count else None

        pods: set[str] = wait(exactly, f"{count} running worker pods")
        wait(lambda: limits_of(pods), f"limits gpu:<pod> for {sorted(pods)}")
        return pods

    dev_cluster.apply(chart_test_pool(pool, api, replicas=2), namespace=ns)
    deployment = wait(
        lambda: get_json(dev_cluster, "deployment", pool, "-n", ns), "the worker Deployment"
    )
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("GpuWorkerPool", pool, True)
    for meta in (deployment["metadata"], deployment["spec"]["template"]["metadata"]):
        assert meta["labels"]["app.kubernetes.io/instance"] == f"gpuworkerpool-{pool}"
        assert not [k for k in meta.get("annotations") or {} if k.startswith("argocd.")]
    first = workers(2)

    def ready() -> bool:
        body = get_json(dev_cluster, "gwp", pool, "-n", ns) or {}
        status, generation = body.get("status") or {}, body["metadata"]["generation"]
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
        return status.get("observedGeneration") == generation and conditions == {
            "Ready": "True",
            "Reconciling": "False",
            "Degraded": "False",
        }

    wait(ready, "pool Ready for its current generation")

    dev_cluster.kubectl("scale", f"gwp/{pool}", "--replicas=3", "-n", ns)
    wait(
        lambda: (
            (get_json(dev_cluster, "deployment", pool, "-n", ns) or {})["spec"]["replicas"] == 3
        ),
        "Deployment scaled to 3",
    )
    scaled = workers(3)
    assert first < scaled
    wait(ready, "pool Ready at 3 replicas")

    dev_cluster.kubectl("scale", f"gwp/{pool}", "--replicas=1", "-n", ns)
    remaining = workers(1)
    gone = scaled - remaining
    wait(
        lambda: not any(PrefectLimits(api).get(f"gpu:{p}") for p in gone),
        f"limits of removed pods {sorted(gone)} deleted",
    )
    wait(ready, "pool Ready at 1 replica")

    # Autoscaling sets replicas through /scale; the budget is server-side applied.
    autoscaled = {"spec": {"autoscaling": {"minReplicas": 2, "maxReplicas": 2,
                                           "pollIntervalSeconds": 2, "cooldownSeconds": 0},
                           "disruption": {"maxUnavailable": 1}}}  # fmt: skip
    dev_cluster.kubectl("patch", "gwp", pool, "-n", ns, "--type=merge",
                        "-p", json.dumps(autoscaled))  # fmt: skip
    workers(2)
    budget = wait(
        lambda: get_json(dev_cluster, "poddisruptionbudget", pool, "-n", ns), "the budget"
    )
    assert budget["spec"]["maxUnavailable"] == 1

    def reasons() -> set[str]:
        events = list_items(
            dev_cluster, "events", "-n", ns, "--field-selector", f"involvedObject.name={pool}"
        )
        return {e["reason"] for e in events}

    # Events are posted asynchronously.
    wait(lambda: {"LimitCreated", "LimitDeleted", "BelowMinReplicas"} <= reasons(), "events")

    dev_cluster.kubectl("delete", "gwp", pool, "-n", ns, "--timeout=120s")
    wait(
        lambda: get_json(dev_cluster, "deployment", pool, "-n", ns) is None,
        "the worker Deployment garbage-collected",
    )
    seen = first | scaled | remaining
    wait(
        lambda: not any(PrefectLimits(api).get(f"gpu:{p}") for p in seen),
        f"every limit of the pool gone: {sorted(seen)}",
    )
    samples = operator.metrics(values["metrics"]["port"])

    # Every API call the operator and kopf made was allowed: no pass failed for
    # want of permission, and no log record reports a refused call.
    forbidden = {k: v for k, v in samples.items() if 'reason="KubernetesForbidden"' in k and v}
    assert not forbidden, forbidden
    denied = denied_api_calls(operator.log())
    assert not denied, "\n".join(denied)


def release_image_tag(cluster: DevCluster, release: Release) -> str:
    deployment = get_json(cluster, "deployment", release.fullname, "-n", release.namespace) or {}
    image: str = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    return image.rsplit(":", 1)[1]


KINDS = "all,sa,role,rolebinding"


def test_helm_uninstall_leaves_nothing_behind_but_the_crd(
    dev_cluster: DevCluster, cluster_helm: Helm, release: Release
) -> None:
    """Pools deleted first (as the README says), then ``helm uninstall``."""
    assert list_items(dev_cluster, "gwp", "-n", release.pools_namespace) == []
    cluster_helm("uninstall", release.name, "-n", release.namespace, "--wait", "--timeout=120s")

    selector = f"app.kubernetes.io/instance={release.name}"
    for ns in (release.namespace, release.pools_namespace):
        # The operator's pod ends on a real kubelet: SIGTERM, kopf stops, then it is gone.
        def gone(namespace: str = ns) -> bool:
            return not list_items(dev_cluster, KINDS, "-n", namespace, "-l", selector)

        wait_for(gone, timeout=90, what=f"everything of the release gone from {ns}")
        # Nothing the operator created either (worker Deployments, their pods).
        operator_made = list_items(
            dev_cluster,
            "deployments,replicasets,pods",
            "-n",
            ns,
            "-l",
            "app.kubernetes.io/managed-by=prefect-gpu-workers-operator",
        )
        assert operator_made == []
    assert list_items(dev_cluster, "clusterrole,clusterrolebinding", "-l", selector) == []
    assert get_json(dev_cluster, "crd", CRD_NAME) is not None, "helm never deletes CRDs"
    listed = cluster_helm("list", "-n", release.namespace, "-q").stdout.split()
    assert release.name not in listed


def test_default_install_grants_cluster_wide_what_it_grants_per_namespace_otherwise(
    dev_cluster: DevCluster, cluster_helm: Helm
) -> None:
    """Without watchNamespaces: ClusterRole + ClusterRoleBinding, Secrets still by name."""
    name, ns, elsewhere = unique("pgw"), unique("pgw-chart"), unique("pgw-pools")
    dev_cluster.create_namespace(ns)
    dev_cluster.create_namespace(elsewhere)
    user = f"system:serviceaccount:{ns}:{name}-prefect-gpu-workers"
    try:
        cluster_helm("install", name, str(CHART), "--namespace", ns, "--set", ANY_API_URL,
                     "--set", f"prefect.apiKeySecret.name={API_KEY_SECRET}")  # fmt: skip
        allowed = [
            ("list", "gpuworkerpools.gpuworkers.dev", None),  # all namespaces at once
            ("watch", "pods", None),
            ("watch", "deployments.apps", None),
            ("patch", "gpuworkerpools.gpuworkers.dev/status", elsewhere),
            ("create", "deployments.apps", elsewhere),
            ("create", "events", elsewhere),
            ("patch", "poddisruptionbudgets.policy", elsewhere),
            ("patch", "gpuworkerpools.gpuworkers.dev/scale", elsewhere),
            ("get", f"secrets/{API_KEY_SECRET}", elsewhere),
            ("list", "nodes", None),
        ]
        denied = [
            ("get", f"secrets/{OTHER_SECRET}", elsewhere),
            ("list", "secrets", None),
            ("list", "namespaces", None),  # kopf does not list them when cluster-wide
            ("delete", "pods", elsewhere),
            ("delete", "deployments.apps", elsewhere),
            ("get", "configmaps", elsewhere),
            ("create", "statefulsets.apps", elsewhere),
        ]
        wrong = [
            (verb, what, where, expected)
            for expected, checks in ((True, allowed), (False, denied))
            for verb, what, where in checks
            if can_i_anywhere(dev_cluster, user, verb, what, where) != expected
        ]
        assert not wrong, f"(verb, resource, namespace or all, expected): {wrong}"
    finally:
        cluster_helm("uninstall", name, "--namespace", ns, "--wait", "--ignore-not-found")
        dev_cluster.delete_namespaces(ns, elsewhere)
    selector = f"app.kubernetes.io/instance={name}"
    assert list_items(dev_cluster, "clusterrole,clusterrolebinding", "-l", selector) == []


def can_i_anywhere(
    cluster: DevCluster, user: str, verb: str, what: str, namespace: str | None
) -> bool:
    """can-i in one namespace, or across all namespaces (None)."""
    where = ["-n", namespace] if namespace else ["--all-namespaces"]
    proc = cluster.kubectl("auth", "can-i", verb, what, f"--as={user}", *where, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0
