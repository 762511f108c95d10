"""Fixtures for tests against the dev control plane (``hack/dev-cluster``).

``dev_cluster`` (session) makes sure the cluster is up -- reusing a running one
-- and hands out a :class:`~.cluster.DevCluster`: kubeconfig path, a ``kubectl``
helper, Kubernetes API clients (admin or a bearer token) and helpers to add and
remove fake nodes. It tears the cluster down at the end of the session only
when it started it and no other test run (``up --holder``) still uses it;
``PGW_DEV_CLUSTER_KEEP=1`` keeps it running. Every test under tests/cluster
is marked ``cluster`` (tests/conftest.py).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_gpu_workers.server import LocalPrefectServer

from .cluster import BUILD_TOOLS, DEV_CLUSTER, DevCluster, run
from .node_workers import NodeWorkers
from .operator_harness import (
    GROUP_LABEL,
    KIND_LABEL,
    OperatorProcess,
    Pools,
    PrefectLimits,
    install_crd,
    running_operator,
)
from .real_node import Image, RealNode, build_images, find_real_node


def _cluster_running() -> bool:
    return run([DEV_CLUSTER, "status"], timeout=60).returncode == 0


@pytest.fixture(scope="session")
def dev_cluster() -> Iterator[DevCluster]:
    """The dev control plane; started (and later stopped) here only if it was not running."""
    started_here = not _cluster_running()
    holder = str(os.getpid())  # registered, so another run's `down` leaves the cluster up
    up = run([DEV_CLUSTER, "up", "--holder", holder], timeout=3600)  # cold tool build: minutes
    if up.returncode != 0:
        pytest.fail(f"hack/dev-cluster up failed ({up.returncode}):\n{up.stderr}{up.stdout}")
    kubeconfig = Path(up.stdout.strip().splitlines()[-1])
    tools = run([BUILD_TOOLS, "kubernetes"])
    if tools.returncode != 0:
        pytest.fail(f"hack/build-tools failed:\n{tools.stderr}")
    kubectl_path = Path(tools.stdout.strip().splitlines()[-1]) / "kubectl"

    cluster = DevCluster(kubeconfig, kubectl_path, started_here)
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        if started_here and not os.environ.get("PGW_DEV_CLUSTER_KEEP"):
            # Stops it unless another test run still holds it.
            down = run([DEV_CLUSTER, "down", "--holder", holder], timeout=120)
            if down.returncode != 0:
                pytest.fail(f"hack/dev-cluster down failed:\n{down.stderr}")
        else:
            if cluster.added_nodes:
                cluster.remove_test_nodes()  # the cluster stays: leave it as found
            run([DEV_CLUSTER, "release", holder], timeout=60)


@pytest.fixture
def namespace(dev_cluster: DevCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting)."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    dev_cluster.create_namespace(name)
    yield name
    dev_cluster.delete_namespaces(name)


@pytest.fixture(scope="module")
def node_group(dev_cluster: DevCluster) -> Iterator[str]:
    """Fake nodes for the test module: 2 x 8 GPUs, 4 GPUs, MIG, time-sliced, CPU only."""
    group = f"op-{uuid.uuid4().hex[:5]}"
    install_crd(dev_cluster)
    taint = {"key": GROUP_LABEL, "value": group, "effect": "NoSchedule"}
    nodes: dict[str, dict[str, Any]] = {
        "gpu8a": {"gpus": 8, "kind": "gpu8"},
        "gpu8b": {"gpus": 8, "kind": "gpu8"},
        "gpu4": {"gpus": 4, "kind": "gpu4"},
        "mig": {
            "resources": {"nvidia.com/mig-1g.10gb": "7"},
            "kind": "mig",
            "labels": {"nvidia.com/mig.strategy": "mixed"},
        },
        "ts": {
            "gpus": 8,
            "kind": "ts",
            "labels": {"nvidia.com/gpu.replicas": "4", "nvidia.com/gpu.count": "2"},
        },
        "cpu": {"kind": "cpu"},
    }
    for suffix, node in nodes.items():
        dev_cluster.add_node(
            f"{group}-{suffix}",
            gpus=node.get("gpus", 0),
            resources=node.get("resources"),
            labels={GROUP_LABEL: group, KIND_LABEL: node["kind"], **node.get("labels", {})},
            taints=[taint],
        )
    yield group
    for suffix in nodes:
        dev_cluster.remove_node(f"{group}-{suffix}")


@pytest.fixture
def operator(
    dev_cluster: DevCluster, namespace: str, node_group: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    with running_operator(dev_cluster, namespace, tmp_path / "operator.log") as proc:
        yield proc


@pytest.fixture
def pools(dev_cluster: DevCluster, namespace: str) -> Pools:
    return Pools(dev_cluster, namespace)


@pytest.fixture
def limits(prefect_server: LocalPrefectServer) -> PrefectLimits:
    return PrefectLimits(prefect_server.api_url)


@pytest.fixture(scope="session")
def real_node(dev_cluster: DevCluster) -> RealNode:
    """The dev cluster's real node (kubelet, containerd, runc); fails where it is missing."""
    node = find_real_node(dev_cluster)
    if node is None:
        status = run([DEV_CLUSTER, "status"], timeout=60).stdout
        pytest.fail(
            "the dev cluster has no real node: it needs root and the Debian packages "
            f"containerd runc containernetworking-plugins buildah (hack/dev-cluster up):\n{status}"
        )
    return node


@pytest.fixture(scope="session")
def project_images(real_node: RealNode) -> dict[str, Image]:
    """The worker and operator images, built here (cached) and loaded into the real node."""
    images = build_images()
    for name in ("worker", "operator"):
        real_node.load(images[name])
    return images


@pytest.fixture(scope="module")
def node_prefect_server(
    real_node: RealNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalPrefectServer]:
    """A Prefect server the real node's pods reach: it listens on the node's bridge."""
    home = tmp_path_factory.mktemp("node-prefect")
    server = LocalPrefectServer(home=home, host=real_node.host_ip, database="postgres")
    server.start(timeout_s=300)
    yield server
    server.stop()


@pytest.fixture
def prefect(node_prefect_server: LocalPrefectServer) -> Iterator[SyncPrefectClient]:
    """A client of the Prefect server the node's pods use (deployments go there too)."""
    with (
        temporary_settings(updates={PREFECT_API_URL: node_prefect_server.api_url}),
        get_client(sync_client=True) as prefect_client,
    ):
        yield prefect_client


@pytest.fixture
def node_workers(
    operator: OperatorProcess,
    dev_cluster: DevCluster,
    namespace: str,
    real_node: RealNode,
    project_images: dict[str, Image],
    node_prefect_server: LocalPrefectServer,
) -> NodeWorkers:
    """Pools of this test's namespace on the real node, with the operator running."""
    api_url = node_prefect_server.api_url
    pools = Pools(dev_cluster, namespace)
    return NodeWorkers(real_node, project_images["worker"], api_url, pools, PrefectLimits(api_url))
