"""Run the real operator against the dev cluster and a real Prefect server, for tests.

The operator runs as a subprocess (``python -m pgw_operator --namespace NS``),
exactly as in its container, so tests can stop and restart it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
from kubernetes import client

from prefect_gpu_workers.server import free_port, stop_process_group

from .cluster import REPO_ROOT, DevCluster, wait_for
from .real_node import TAINT_KEY

CRD = REPO_ROOT / "crds" / "gpuworkerpools.gpuworkers.dev.yaml"
LIMIT_CRD = REPO_ROOT / "crds" / "gpuworkerlimits.gpuworkers.dev.yaml"
GROUP, VERSION, PLURAL = "gpuworkers.dev", "v1alpha1", "gpuworkerpools"
LIMIT_PLURAL = "gpuworkerlimits"
POOL_LABEL = "gpuworkers.dev/pool"
# Fake nodes of one test module carry its group (label and taint) and a kind.
GROUP_LABEL = "pgw-test/group"
# Taints of the tests' nodes (the node group's, the real node's) and the GPU one.
TEST_TAINT_KEYS = (GROUP_LABEL, TAINT_KEY, "nvidia.com/gpu")
KIND_LABEL = "pgw-test/kind"


def wait_established(cluster: DevCluster, crd: str, timeout: float = 60.0) -> None:
    """Wait until the API server serves ``crd``. Polled, not ``kubectl wait``: that
    fails at once on a CRD whose status the API server has not written yet."""

    def established() -> bool:
        found = cluster.kubectl("get", "crd", crd, "-o", "json", check=False)
        if found.returncode != 0:
            return False
        conditions = (json.loads(found.stdout).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    wait_for(established, timeout=timeout, interval=0.2, what=f"CRD {crd} established")


def install_crd(cluster: DevCluster) -> None:
    """Both of this checkout's CRDs: GpuWorkerPool and GpuWorkerLimit."""
    for crd in (CRD, LIMIT_CRD):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    for name in ("gpuworkerpools.gpuworkers.dev", "gpuworkerlimits.gpuworkers.dev"):
        wait_established(cluster, name)


@dataclass
class OperatorProcess:
    """``python -m pgw_operator`` watching one namespace, logging to a file.

    ``kubeconfig`` decides who it is: the admin, or (chart tests) the chart's
    ServiceAccount through a token kubeconfig.
    """

    kubeconfig: Path
    namespace: str
    log_path: Path
    liveness: str = ""  # e.g. http://127.0.0.1:PORT/healthz; off when empty
    # --log-format json: one record per line, which denied_api_calls() reads by field.
    log_format: str = "json"
    metrics_port: int | None = None  # serve /metrics on 127.0.0.1:PORT when set
    # Put first on the import path: another release's operator and core (upgrade tests).
    pythonpath: tuple[Path, ...] = ()
    # The tests' Prefect servers are on 127.0.0.1 over http: allowed out loud,
    # unless a test gives its own (e.g. ("--allowed-api-url", URL)); and the
    # taints of the tests' nodes may be tolerated.
    extra_args: tuple[str, ...] = (
        "--allow-any-api-url",
        *(f"--allowed-toleration-key={key}" for key in TEST_TAINT_KEYS),
    )
    _proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        # In-cluster settings would win over KUBECONFIG; this is not a pod.
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env["KUBECONFIG"] = str(self.kubeconfig)
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(str(p) for p in self.pythonpath)
        command = [sys.executable, "-m", "pgw_operator", "--namespace", self.namespace,
                   "--liveness", self.liveness, "--log-format", self.log_format]  # fmt: skip
        if self.metrics_port is not None:
            command += ["--metrics", f"127.0.0.1:{self.metrics_port}"]
        command += self.extra_args
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process_group(proc, grace_s=45)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def assert_alive(self) -> None:
        assert self.alive(), f"operator exited; log tail:\n{self.log_tail()}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def metrics(self) -> dict[str, float]:
        """The operator's Prometheus samples, ``name{labels}`` -> value."""
        assert self.metrics_port is not None, "started without --metrics"
        response = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
        response.raise_for_status()
        return parse_metrics(response.text)

    def kill(self) -> None:
        """SIGKILL its process group, as a node lost or an OOM kill would: no cleanup."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def leader_election_args(
    namespace: str, identity: str, lease: str, timing: tuple[float, float, float] = (4, 3, 1)
) -> tuple[str, ...]:
    """``--leader-elect`` flags for a test operator: its Lease in ``namespace``, a short
    lease duration, renew deadline and retry period (seconds) so failover is quick."""
    duration, deadline, retry = timing
    return (
        "--leader-elect", f"--leader-elect-namespace={namespace}",
        f"--leader-elect-identity={identity}", f"--leader-elect-lease-name={lease}",
        f"--leader-elect-lease-duration={duration:g}",
        f"--leader-elect-renew-deadline={deadline:g}",
        f"--leader-elect-retry-period={retry:g}",
    )  # fmt: skip


def lease_holder(cluster: DevCluster, namespace: str, name: str) -> str | None:
    """The Lease's holderIdentity; None when there is no Lease or no holder."""
    try:
        lease = client.CoordinationV1Api(cluster.api_client()).read_namespaced_lease(
            name, namespace
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    holder = lease.spec.holder_identity if lease.spec else None
    return str(holder) if holder else None


@contextmanager
def running_operator(
    cluster: DevCluster, namespace: str, log_path: Path
) -> Iterator[OperatorProcess]:
    """The operator watching ``namespace``, its metrics on a free port; its log tail
    is printed when it stops (pytest shows it for a failed test)."""
    proc = OperatorProcess(cluster.kubeconfig, namespace, log_path, metrics_port=free_port())
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        print(f"--- operator log ({namespace}) ---\n{proc.log_tail(80)}")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> ``{"name{labels}": value}`` (comments skipped)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


# What the operator and kopf say when the API server refuses a call (HTTP 403):
# - the operator's own structured fields: `reason` KubernetesForbidden on a failed
#   pass, `status` 403 on a failed side call (pod deletion cost);
# - the reason phrase "Forbidden" (kubernetes client's ApiException, kopf's
#   APIForbiddenError) and kopf's "Not enough permissions to ..." warnings.
# Matched in a record's message only, and case-sensitively: timestamps, durations
# and object names (lowercase) can never contain them, unlike a bare "403".
_DENIAL_PHRASES = re.compile(r"Forbidden|Not enough permissions")


def denied_api_calls(log: str) -> list[str]:
    """Log lines that report a Kubernetes API call refused for lack of permission.

    Reads ``--log-format json`` records by field; a line that is not JSON (a
    plain-format log, a traceback) is read as its message.
    """
    denied: list[str] = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            record = {"message": line}
        message = str(record.get("message", ""))
        if (
            record.get("reason") == "KubernetesForbidden"
            or record.get("status") == 403
            or _DENIAL_PHRASES.search(message)
            or _DENIAL_PHRASES.search(str(record.get("exc_info", "")))
        ):
            denied.append(line)
    return denied


class Pools:
    """GpuWorkerPool objects of one namespace, through the admin API client (or another)."""

    def __init__(
        self, cluster: DevCluster, namespace: str, api_client: client.ApiClient | None = None
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        api_client = api_client or cluster.api_client()  # the admin unless given
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GpuWorkerPool",
                "metadata": {"name": name}, "spec": spec}  # fmt: skip
        created = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )
        return cast(dict[str, Any], created)

    def get(self, name: str) -> dict[str, Any]:
        pool = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return cast(dict[str, Any], pool)

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def scale(self, name: str, replicas: int) -> None:
        self.custom.patch_namespaced_custom_object_scale(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": {"replicas": replicas}}
        )

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        """Merge ``spec`` into the pool's spec."""
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def touch(self, name: str) -> None:
        """Change an annotation of the pool: an event for the operator, no spec change."""
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name,
            {"metadata": {"annotations": {"pgw-test/touched": str(time.time())}}},
        )  # fmt: skip

    def worker_container(self, pool: str) -> dict[str, Any]:
        """The worker container of the pool's Deployment, as plain JSON."""
        deployment = self.apps.api_client.sanitize_for_serialization(
            self.apps.read_namespaced_deployment(pool, self.namespace)
        )
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        return cast(dict[str, Any], container)

    def deletion_cost(self, pod: str) -> str | None:
        meta = self.core.read_namespaced_pod(pod, self.namespace).metadata
        annotations = (meta.annotations if meta else None) or {}
        return annotations.get("controller.kubernetes.io/pod-deletion-cost")

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def pods(self, pool: str) -> list[client.V1Pod]:
        items = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{POOL_LABEL}={pool}"
        ).items
        return list(items)

    def running_pods(self, pool: str) -> dict[str, str]:
        """Pod name -> node, for pods bound and Running (not being deleted)."""
        running: dict[str, str] = {}
        for pod in self.pods(pool):
            meta, spec, status = pod.metadata, pod.spec, pod.status
            assert meta is not None
            assert spec is not None
            assert status is not None
            if status.phase == "Running" and meta.deletion_timestamp is None:
                running[str(meta.name)] = str(spec.node_name)
        return running

    def worker_limits(self, pool: str) -> list[dict[str, Any]]:
        """The pool's GpuWorkerLimit objects (one per worker pod)."""
        listed = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, LIMIT_PLURAL, label_selector=f"{POOL_LABEL}={pool}"
        )
        return cast(list[dict[str, Any]], cast(dict[str, Any], listed)["items"])

    def limit_entries(self, pool: str) -> list[dict[str, Any]]:
        """One entry per limit the pool's objects name: pod, node, kind, name, size,
        gpus, restarts (the ledger, as the old ``status.workers`` had it)."""
        return [
            {"pod": o["spec"]["pod"], "node": o["spec"].get("node", ""),
             "restarts": o["spec"].get("restarts", 0),
             "kind": limit["kind"], "limitName": limit["name"], "limitSize": limit["size"],
             "gpus": limit.get("gpus", "")}
            for o in self.worker_limits(pool) for limit in o["spec"]["limits"]
        ]  # fmt: skip

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        conditions = (self.get(name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == kind), None)

    def events(self, name: str) -> list[client.CoreV1Event]:
        events = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        ).items
        return list(events)


class PrefectLimits:
    """Read and create global concurrency limits through Prefect's REST API."""

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url

    def get(self, name: str) -> dict[str, Any] | None:
        response = httpx.get(f"{self.api_url}/v2/concurrency_limits/{name}", timeout=10)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def create(self, name: str, limit: int) -> None:
        response = httpx.post(
            f"{self.api_url}/v2/concurrency_limits/",
            json={"name": name, "limit": limit},
            timeout=10,
        )
        response.raise_for_status()

    def delete(self, name: str) -> None:
        """Delete a limit behind the operator's back (404: already gone)."""
        response = httpx.delete(f"{self.api_url}/v2/concurrency_limits/{name}", timeout=10)
        if response.status_code != 404:
            response.raise_for_status()

    def hold_slot(self, name: str, lease_s: int = 300) -> None:
        """Take one slot of ``name``, as a GPU step does (released when the lease expires)."""
        response = httpx.post(
            f"{self.api_url}/v2/concurrency_limits/increment-with-lease",
            json={"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": lease_s},
            timeout=10,
        )
        response.raise_for_status()

    def all_names(self) -> set[str]:
        response = httpx.post(
            f"{self.api_url}/v2/concurrency_limits/filter", json={"limit": 200}, timeout=10
        )
        response.raise_for_status()
        return {item["name"] for item in response.json()}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:5]}"


def wait_until(probe: Any, what: str, timeout: float = 90.0, interval: float = 0.5) -> Any:
    return wait_for(probe, timeout=timeout, interval=interval, what=what)


def settle(seconds: float) -> None:
    """Give a controller time to (wrongly) act, before asserting it did not."""
    time.sleep(seconds)


# Pools as the tests build them ------------------------------------------------


def pool_spec(
    api_url: str, group: str, node_kind: str, gpu: dict[str, Any], replicas: int = 1
) -> dict[str, Any]:
    return {
        "replicas": replicas,
        "workPool": {"name": f"pool-{group}"},
        "prefect": {"apiUrl": api_url},
        "gpu": gpu,
        "worker": {
            "image": "registry.invalid/prefect-gpu-worker:test",
            "drainGracePeriodSeconds": 0,
            "podTemplate": {
                "nodeSelector": {GROUP_LABEL: group, KIND_LABEL: node_kind},
                "tolerations": [
                    {
                        "key": GROUP_LABEL,
                        "operator": "Equal",
                        "value": group,
                        "effect": "NoSchedule",
                    }
                ],
            },
        },
    }


def ready_with_limits(
    pools: Pools, limits: PrefectLimits, pool: str, replicas: int, prefix: str = "gpu"
) -> dict[str, dict[str, Any]] | None:
    """Once the pool is Ready with `replicas` running pods, each with its limit: name -> limit."""
    running = pools.running_pods(pool)
    ready = pools.condition(pool, "Ready")
    if len(running) != replicas or not ready or ready["status"] != "True":
        return None
    return limits_of(limits, running, prefix)


def limits_of(
    limits: PrefectLimits, pods: Iterable[str], prefix: str = "gpu"
) -> dict[str, dict[str, Any]] | None:
    """Each pod's limit ``{prefix}:{pod}``, once every one exists: pod -> limit."""
    found = {pod: limits.get(f"{prefix}:{pod}") for pod in pods}
    if any(limit is None for limit in found.values()):
        return None
    return {pod: limit for pod, limit in found.items() if limit is not None}


def start_pool(
    pools: Pools, limits: PrefectLimits, name: str, spec: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Create a pool and wait until it is Ready with one limit per replica: pod -> limit."""
    pools.create(name, spec)
    replicas = spec["replicas"]
    found: dict[str, dict[str, Any]] = wait_until(
        lambda: ready_with_limits(pools, limits, name, replicas),
        f"pool {name} Ready with {replicas} limits",
    )
    return found


def pool_text(pools: Pools, name: str) -> str:
    """Everything the pool's owner can read about it: the object and its Events."""
    events = [f"{e.reason}: {e.message}" for e in pools.events(name)]
    return json.dumps(pools.get(name)) + "\n" + "\n".join(events)


def degraded_with(pools: Pools, name: str, reason: str) -> dict[str, Any] | None:
    condition = pools.condition(name, "Degraded")
    if condition and condition["status"] == "True" and condition["reason"] == reason:
        return condition
    return None
