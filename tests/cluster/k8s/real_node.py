"""The dev cluster's real node (hack/dev-cluster.d/node.sh), for tests.

A kubelet, containerd and runc run pods there from the project's own images,
built here by hack/build-images and imported into the node's containerd. A pod
reaches a server on this machine at the node's bridge address
(:attr:`RealNode.host_ip`), which is where the tests bind the Prefect server
the worker pods use. The test reads what a pod writes to its ``/tmp`` emptyDir
straight from the kubelet's directory on this machine.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client

from .cluster import REPO_ROOT, DevCluster, run

NODE_LABEL = ("prefect-gpu-workers.dev/dev-cluster", "real-node")
TAINT_KEY = "prefect-gpu-workers.dev/real-node"
BUILD_IMAGES = REPO_ROOT / "hack" / "build-images"


@dataclass(frozen=True)
class Image:
    """An image hack/build-images made: its reference, OCI archive and size."""

    name: str
    ref: str
    archive: Path
    size_bytes: int


@dataclass(frozen=True)
class RealNode:
    name: str
    host_ip: str  # the node's address on its bridge: pods reach this machine here
    containerd_socket: Path
    kubelet_dir: Path

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``ctr`` against the node's containerd, in the kubelet's namespace."""
        return subprocess.run(
            ["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def load(self, image: Image) -> None:
        """Import ``image`` into the node, unless it is there already (pods never pull)."""
        if image.ref in self.ctr("images", "ls", "-q").stdout.split():
            return
        imported = self.ctr("images", "import", str(image.archive))
        assert imported.returncode == 0, f"import of {image.ref} failed: {imported.stderr}"

    def kill(self, container_id: str, signal: str = "SIGKILL") -> None:
        """Signal a container's main process, as the OOM killer or a crash would end it."""
        killed = self.ctr("tasks", "kill", "--signal", signal, container_id)
        assert killed.returncode == 0, killed.stderr

    def empty_dir(self, pod_uid: str, volume: str) -> Path:
        """Where the kubelet keeps a pod's emptyDir ``volume`` on this machine."""
        return self.kubelet_dir / "pods" / pod_uid / "volumes" / "kubernetes.io~empty-dir" / volume

    def placement(self) -> dict[str, Any]:
        """Pod template fields that put a pod on this node (and only there)."""
        return {
            "nodeSelector": {NODE_LABEL[0]: NODE_LABEL[1]},
            "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
        }


def find_real_node(cluster: DevCluster) -> RealNode | None:
    """The dev cluster's real node, if it has one."""
    nodes = (
        client.CoreV1Api(cluster.api_client())
        .list_node(label_selector=f"{NODE_LABEL[0]}={NODE_LABEL[1]}")
        .items
    )
    if not nodes:
        return None
    (node,) = nodes
    assert node.metadata is not None
    assert node.status is not None
    addresses = {a.type: a.address for a in node.status.addresses or []}
    # hack/dev-cluster keeps the node's files next to the kubeconfig it wrote.
    node_dir = cluster.kubeconfig.parent / "node"
    return RealNode(
        name=str(node.metadata.name),
        host_ip=addresses["InternalIP"],
        containerd_socket=node_dir / "containerd.sock",
        kubelet_dir=node_dir / "kubelet",
    )


def build_images() -> dict[str, Image]:
    """Run hack/build-images (cached: a warm run builds nothing); name -> image."""
    built = run([BUILD_IMAGES], timeout=3600)
    assert built.returncode == 0, f"hack/build-images failed:\n{built.stderr[-4000:]}"
    images = {}
    for line in built.stdout.splitlines():
        name, ref, archive, size = line.split()
        images[name] = Image(name, ref, Path(archive), int(size))
    return images
