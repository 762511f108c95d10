"""The dev control plane (hack/dev-cluster) as tests see it: kubectl, API clients, fake nodes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config

REPO_ROOT = Path(__file__).resolve().parents[3]
DEV_CLUSTER = REPO_ROOT / "hack" / "dev-cluster"
BUILD_TOOLS = REPO_ROOT / "hack" / "build-tools"

# Label on every node a test adds, so leftovers can be found and removed.
TEST_NODE_LABEL = "prefect-gpu-workers.dev/test-node"
# kwok manages (keeps Ready, runs pods on) nodes carrying this annotation.
KWOK_ANNOTATION = "kwok.x-k8s.io/node"

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None], *, timeout: float = 60.0, interval: float = 0.2, what: str
) -> T:
    """Call ``probe`` until it returns something other than None or False."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def run(args: Sequence[str | Path], *, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class DevCluster:
    """A running dev control plane, as seen from the tests."""

    kubeconfig: Path
    kubectl_path: Path
    started_here: bool
    added_nodes: set[str] = field(default_factory=set)

    # --- kubectl ---------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against the cluster; raise with its output on failure."""
        proc = subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def kubectl_json(self, *args: str) -> Any:
        """``kubectl get ... -o json``, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(self, manifest: Mapping[str, Any], namespace: str | None = None) -> None:
        """``kubectl apply`` one object given as a dict."""
        ns = ["-n", namespace] if namespace else []
        self.kubectl(*ns, "apply", "-f", "-", input=json.dumps(manifest))

    def create_namespace(self, name: str) -> None:
        """Create a namespace and wait for its ServiceAccount ``default`` (pods need
        it: ServiceAccount admission)."""
        self.kubectl("create", "namespace", name)
        wait_for(
            lambda: self.kubectl("-n", name, "get", "sa", "default", check=False).returncode == 0,
            timeout=30,
            what=f"ServiceAccount default in {name}",
        )

    def delete_namespaces(self, *names: str) -> None:
        """Delete namespaces without waiting for them to go."""
        for name in names:
            self.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should talk to this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    # --- API clients -------------------------------------------------------------

    def configuration(self) -> client.Configuration:
        """Client configuration of the cluster admin (client certificate)."""
        cfg = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig), client_configuration=cfg
        )
        return cfg

    def api_client(self, token: str | None = None) -> client.ApiClient:
        """An API client: the admin, or whoever ``token`` (a bearer token) belongs to."""
        cfg = self.configuration()
        if token is not None:
            cfg = copy.copy(cfg)
            cfg.cert_file = None
            cfg.key_file = None
            cfg.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(cfg)

    # --- fake nodes ----------------------------------------------------------------

    def add_node(
        self,
        name: str,
        *,
        gpus: int = 0,
        resources: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        taints: Sequence[Mapping[str, str]] = (),
        managed: bool = True,
        wait_ready: bool = True,
        timeout: float = 60,
    ) -> dict[str, Any]:
        """Register a fake node and (by default) wait until kwok reports it Ready.

        ``gpus`` advertises ``nvidia.com/gpu`` with GPU-feature-discovery labels;
        ``resources`` adds or overrides capacity (e.g. ``{"nvidia.com/mig-1g.10gb": "7"}``);
        ``managed=False`` leaves the node without kubelet (kwok), so it never turns Ready.
        Returns the node as the API server stored it.
        """
        capacity = {"cpu": "32", "memory": "128Gi", "pods": "110"}
        node_labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            TEST_NODE_LABEL: "true",
        }
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
            node_labels |= {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                "nvidia.com/gpu.memory": "81559",
            }
        capacity |= dict(resources or {})
        node_labels |= dict(labels or {})
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": node_labels,
                "annotations": {KWOK_ANNOTATION: "fake"} if managed else {},
            },
            "spec": {"taints": [dict(t) for t in taints]},
            # Accepted on create (as from a kubelet registering); kwok keeps it.
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        self.kubectl("create", "-f", "-", input=json.dumps(node))
        self.added_nodes.add(name)
        if wait_ready:
            self.kubectl("wait", "--for=condition=Ready", f"node/{name}", f"--timeout={timeout}s")
        stored: dict[str, Any] = self.kubectl_json("get", "node", name)
        return stored

    def remove_node(self, name: str, *, timeout: float = 60) -> None:
        """Delete a node and wait until the API server no longer has it."""
        self.kubectl("delete", "node", name, "--ignore-not-found", f"--timeout={timeout}s")
        self.added_nodes.discard(name)

    def remove_test_nodes(self) -> None:
        """Remove every node a test added (by label), e.g. after a failed test."""
        self.kubectl("delete", "node", "-l", TEST_NODE_LABEL, "--ignore-not-found")
        self.added_nodes.clear()
