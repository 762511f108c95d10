"""The dev control plane is a real one: controllers, scheduler, GC and RBAC at work.

Nothing here is mocked: Deployments become ReplicaSets and pods through
kube-controller-manager, kube-scheduler places pods by their resource
requests, kwok (the fake kubelet) runs them, the garbage collector follows
owner references, and RBAC judges ServiceAccount tokens.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .cluster import DevCluster, wait_for

pytestmark = pytest.mark.cluster

BASE_NODES = ("gpu-8", "gpu-4", "gpu-1", "mig", "timesliced", "cpu")
# Base nodes (hack/dev-cluster.d/nodes.yaml) with at least 2 nvidia.com/gpu, and the rest.
TWO_GPU_NODES = {"gpu-8", "gpu-4", "timesliced"}
NO_TWO_GPU_NODES = {"gpu-1", "cpu", "mig"}

Pod = dict[str, Any]


def gpu_deployment(
    name: str,
    *,
    replicas: int,
    gpus: int,
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """A Deployment whose pods each ask for ``gpus`` whole GPUs."""
    container = {
        "name": "worker",
        "image": "example.invalid/worker:1",
        "resources": {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            # An extended resource: its request defaults to the limit.
            "limits": {"nvidia.com/gpu": str(gpus)},
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": node_selector or {},
                    "tolerations": tolerations or [],
                    "terminationGracePeriodSeconds": 0,
                    "containers": [container],
                },
            },
        },
    }


def pods_of(cluster: DevCluster, namespace: str, app: str) -> list[Pod]:
    pods: list[Pod] = cluster.kubectl_json("-n", namespace, "get", "pods", "-l", f"app={app}")[
        "items"
    ]
    return pods


def is_running(pod: Pod) -> bool:
    return pod["status"].get("phase") == "Running" and "deletionTimestamp" not in pod["metadata"]


def condition(pod: Pod, kind: str) -> dict[str, Any] | None:
    found = [c for c in pod["status"].get("conditions", []) if c["type"] == kind]
    return found[0] if found else None


def wait_running(cluster: DevCluster, namespace: str, app: str, count: int) -> list[Pod]:
    """Wait until exactly ``count`` pods of ``app`` exist and all of them run."""

    def probe() -> list[Pod] | None:
        pods = pods_of(cluster, namespace, app)
        return pods if len(pods) == count and all(map(is_running, pods)) else None

    return wait_for(probe, timeout=60, what=f"{count} Running pods of {app} in {namespace}")


def wait_unschedulable(cluster: DevCluster, namespace: str, app: str) -> list[Pod]:
    """Wait until some pod of ``app`` is marked Unschedulable by the scheduler."""

    def probe() -> list[Pod] | None:
        pods = pods_of(cluster, namespace, app)
        stuck = [
            p for p in pods if (condition(p, "PodScheduled") or {}).get("reason") == "Unschedulable"
        ]
        return stuck or None

    return wait_for(probe, timeout=30, what=f"an Unschedulable pod of {app}")


def api_status(call: Callable[[], object]) -> int:
    """HTTP status of an API call: 200 when it succeeds, else the error's status."""
    try:
        call()
    except ApiException as exc:
        status: int = exc.status
        return status
    return 200


def test_fake_nodes_are_ready_and_advertise_gpus(dev_cluster: DevCluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in dev_cluster.kubectl_json("get", "nodes")["items"]}
    assert set(BASE_NODES) <= nodes.keys()
    for name in BASE_NODES:
        assert (condition(nodes[name], "Ready") or {}).get("status") == "True", name
    alloc = {name: node["status"]["allocatable"] for name, node in nodes.items()}
    assert alloc["gpu-8"]["nvidia.com/gpu"] == "8"
    assert alloc["gpu-4"]["nvidia.com/gpu"] == "4"
    assert alloc["gpu-1"]["nvidia.com/gpu"] == "1"
    assert alloc["timesliced"]["nvidia.com/gpu"] == "8"
    assert alloc["mig"]["nvidia.com/mig-1g.10gb"] == "7"
    assert "nvidia.com/gpu" not in alloc["mig"]
    assert "nvidia.com/gpu" not in alloc["cpu"]
    timesliced = nodes["timesliced"]["metadata"]["labels"]
    assert timesliced["nvidia.com/gpu.count"] == "2"
    assert timesliced["nvidia.com/gpu.replicas"] == "4"
    assert nodes["mig"]["metadata"]["labels"]["nvidia.com/mig.strategy"] == "mixed"
    for name in ("gpu-8", "gpu-4", "gpu-1", "timesliced"):
        labels = nodes[name]["metadata"]["labels"]
        assert {"nvidia.com/gpu.count", "nvidia.com/gpu.product", "nvidia.com/gpu.memory"} <= set(
            labels
        ), name


def test_deployment_pods_run_on_nodes_with_enough_gpus(
    dev_cluster: DevCluster, namespace: str
) -> None:
    dev_cluster.apply(gpu_deployment("two-gpus", replicas=3, gpus=2), namespace)
    pods = wait_running(dev_cluster, namespace, "two-gpus", 3)
    placed = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods}
    assert set(placed.values()) <= TWO_GPU_NODES, placed
    assert not set(placed.values()) & NO_TWO_GPU_NODES, placed
    for pod in pods:  # bound by the scheduler, reported ready by kwok (the kubelet)
        assert (condition(pod, "PodScheduled") or {}).get("status") == "True"
        assert (condition(pod, "Ready") or {}).get("status") == "True"
        assert pod["status"]["podIP"]


def test_scheduler_fits_pods_by_gpu_count(dev_cluster: DevCluster, namespace: str) -> None:
    """On two private nodes with 4 GPUs and 1 GPU, three 2-GPU pods: two fit, one cannot.

    The nodes are tainted for this test alone, so pods of other tests (or other
    users of the shared cluster) cannot take their GPUs.
    """
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    taint = {"key": "prefect-gpu-workers.dev/pool", "value": pool, "effect": "NoSchedule"}
    four, one = f"{pool}-gpu4", f"{pool}-gpu1"
    try:
        for name, gpus in ((four, 4), (one, 1)):
            dev_cluster.add_node(name, gpus=gpus, labels={"pool": pool}, taints=[taint])
        deployment = gpu_deployment(
            "fit",
            replicas=3,
            gpus=2,
            node_selector={"pool": pool},
            tolerations=[{**taint, "operator": "Equal"}],
        )
        dev_cluster.apply(deployment, namespace)

        def two_running_one_pending() -> list[Pod] | None:
            pods = pods_of(dev_cluster, namespace, "fit")
            running = [p for p in pods if is_running(p)]
            return pods if len(pods) == 3 and len(running) == 2 else None

        pods = wait_for(two_running_one_pending, timeout=60, what="2 of 3 pods Running")
        assert {p["spec"]["nodeName"] for p in pods if is_running(p)} == {four}
        (stuck,) = wait_unschedulable(dev_cluster, namespace, "fit")
        assert "nodeName" not in stuck["spec"]
        message = (condition(stuck, "PodScheduled") or {}).get("message", "")
        assert "Insufficient nvidia.com/gpu" in message
    finally:
        dev_cluster.kubectl("-n", namespace, "delete", "deployment", "fit", "--ignore-not-found")
        for name in (four, one):
            dev_cluster.remove_node(name)


def test_scaling_down_deletes_pods(dev_cluster: DevCluster, namespace: str) -> None:
    dev_cluster.apply(gpu_deployment("scale", replicas=3, gpus=1), namespace)
    before = {p["metadata"]["name"] for p in wait_running(dev_cluster, namespace, "scale", 3)}

    apps = client.AppsV1Api(dev_cluster.api_client())
    apps.patch_namespaced_deployment_scale("scale", namespace, {"spec": {"replicas": 1}})
    after = {p["metadata"]["name"] for p in wait_running(dev_cluster, namespace, "scale", 1)}

    assert after < before
    core = client.CoreV1Api(dev_cluster.api_client())
    for name in before - after:  # really gone, not just Terminating
        assert api_status(partial(core.read_namespaced_pod, name, namespace)) == 404


def test_deleting_a_deployment_garbage_collects_its_replicaset_and_pods(
    dev_cluster: DevCluster, namespace: str
) -> None:
    dev_cluster.apply(gpu_deployment("gc", replicas=2, gpus=1), namespace)
    pods = wait_running(dev_cluster, namespace, "gc", 2)
    ns = ["-n", namespace]
    deployment = dev_cluster.kubectl_json(*ns, "get", "deployment", "gc")
    (replica_set,) = dev_cluster.kubectl_json(*ns, "get", "replicasets", "-l", "app=gc")["items"]
    # The chain the garbage collector follows: Deployment <- ReplicaSet <- Pods.
    owners = [o["uid"] for o in replica_set["metadata"]["ownerReferences"]]
    assert owners == [deployment["metadata"]["uid"]]
    for pod in pods:
        owners = [o["uid"] for o in pod["metadata"]["ownerReferences"]]
        assert owners == [replica_set["metadata"]["uid"]]

    # Background propagation: the API server deletes the Deployment alone; the
    # garbage collector (kube-controller-manager) removes its dependents.
    dev_cluster.kubectl(*ns, "delete", "deployment", "gc", "--cascade=background")

    def all_gone() -> bool:
        replica_sets = dev_cluster.kubectl_json(*ns, "get", "replicasets", "-l", "app=gc")
        return not replica_sets["items"] and not pods_of(dev_cluster, namespace, "gc")

    wait_for(all_gone, timeout=60, what="the garbage collector to delete the ReplicaSet and pods")


def test_service_account_token_is_held_to_its_role(dev_cluster: DevCluster, namespace: str) -> None:
    ns = ["-n", namespace]
    dev_cluster.kubectl(*ns, "create", "serviceaccount", "reader")
    dev_cluster.kubectl(*ns, "create", "role", "pod-reader", "--verb=get,list", "--resource=pods")
    dev_cluster.kubectl(
        *ns, "create", "rolebinding", "reader", "--role=pod-reader",
        f"--serviceaccount={namespace}:reader",
    )  # fmt: skip
    token = dev_cluster.kubectl(*ns, "create", "token", "reader", "--duration=10m").stdout.strip()

    as_reader = dev_cluster.api_client(token=token)
    review = client.AuthenticationV1Api(as_reader).create_self_subject_review(
        client.V1SelfSubjectReview()
    )
    assert review.status is not None
    assert review.status.user_info is not None
    assert review.status.user_info.username == f"system:serviceaccount:{namespace}:reader"

    core = client.CoreV1Api(as_reader)
    # Granted (RBAC sees a new binding within moments).
    wait_for(
        lambda: api_status(lambda: core.list_namespaced_pod(namespace)) == 200,
        timeout=15,
        what="the reader's RoleBinding to take effect",
    )
    # Not granted: another resource, another verb, another namespace, cluster scope.
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="x"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="i")]),
    )
    assert api_status(lambda: core.list_namespaced_secret(namespace)) == 403
    assert api_status(lambda: core.create_namespaced_pod(namespace, pod)) == 403
    assert api_status(lambda: core.list_namespaced_pod("kube-system")) == 403
    assert api_status(lambda: core.list_node()) == 403
    # What the admin can do is unaffected; a token the API server did not sign is nobody.
    admin = client.CoreV1Api(dev_cluster.api_client())
    assert api_status(lambda: admin.create_namespaced_pod(namespace, pod)) == 200
    forged = client.CoreV1Api(dev_cluster.api_client(token=token[:-8] + "AAAAAAAA"))
    assert api_status(lambda: forged.list_namespaced_pod(namespace)) == 401


def test_add_and_remove_a_node(dev_cluster: DevCluster, namespace: str) -> None:
    name = f"extra-{uuid.uuid4().hex[:6]}"
    pinned = gpu_deployment(
        "pinned", replicas=1, gpus=2, node_selector={"kubernetes.io/hostname": name}
    )
    try:
        node = dev_cluster.add_node(name, gpus=2)
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
        dev_cluster.apply(pinned, namespace)
        (pod,) = wait_running(dev_cluster, namespace, "pinned", 1)
        assert pod["spec"]["nodeName"] == name
        dev_cluster.kubectl("-n", namespace, "delete", "deployment", "pinned")
        wait_for(lambda: not pods_of(dev_cluster, namespace, "pinned"), what="the pod to go")
    finally:
        dev_cluster.remove_node(name)

    assert dev_cluster.kubectl("get", "node", name, check=False).returncode != 0
    # With the node gone, a pod pinned to it has nowhere to go.
    dev_cluster.apply(pinned, namespace)
    (stuck,) = wait_unschedulable(dev_cluster, namespace, "pinned")
    assert "nodeName" not in stuck["spec"]


def test_a_node_without_kwok_never_turns_ready(dev_cluster: DevCluster) -> None:
    """kwok manages only annotated nodes: one nobody heartbeats stays NotReady."""
    name = f"unmanaged-{uuid.uuid4().hex[:6]}"
    try:
        dev_cluster.add_node(name, gpus=1, managed=False, wait_ready=False)
        waited = dev_cluster.kubectl(
            "wait", "--for=condition=Ready", f"node/{name}", "--timeout=3s", check=False
        )
        assert waited.returncode != 0
    finally:
        dev_cluster.remove_node(name)
