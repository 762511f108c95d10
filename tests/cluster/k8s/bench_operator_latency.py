"""Benchmark: how fast a pod's limit follows the pod, on the dev control plane.

    hack/dev-cluster up && .venv/bin/python -m tests.cluster.k8s.bench_operator_latency [--pods 60]

Starts a real Prefect server (on the embedded PostgreSQL) and the operator (as
a subprocess, as in its container), scales a GpuWorkerPool from 0 to N on fresh fake nodes, and
records, on this machine's clock:
- bound -> limit: from the watch event that shows the pod bound to a node to
  the first poll (every 50 ms) that finds ``gpu:<pod>`` in Prefect;
- deleted -> limit gone: from the watch event that shows the pod gone from the
  API server to the first poll that no longer finds its limit.
Prints a table (median, p95, max) and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import urllib3
from kubernetes import client, watch

from prefect_gpu_workers.server import LocalPrefectServer, free_port

from .cluster import BUILD_TOOLS, DEV_CLUSTER, DevCluster, run
from .operator_harness import OperatorProcess, Pools, install_crd


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class PodClock(threading.Thread):
    """Watch the pool's pods; note when each is bound and when it is gone."""

    def __init__(self, core: client.CoreV1Api, namespace: str, pool: str) -> None:
        super().__init__(daemon=True)
        self.core, self.namespace, self.pool = core, namespace, pool
        self.bound: dict[str, float] = {}
        self.gone: dict[str, float] = {}
        self.running = True
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]

    def run(self) -> None:
        # A watch may end under load (a dropped connection, an expired version):
        # list again and go on; a pod missing from the new list went meanwhile.
        while self.running:
            try:
                listed: Any = self.core.list_namespaced_pod(
                    self.namespace, label_selector=f"gpuworkers.dev/pool={self.pool}"
                )
                now = time.monotonic()
                names = {pod.metadata.name for pod in listed.items}
                for pod in listed.items:
                    if pod.spec.node_name:
                        self.bound.setdefault(pod.metadata.name, now)
                for name in set(self.bound) - names:
                    self.gone.setdefault(name, now)
                stream = self._watch.stream(  # type: ignore[no-untyped-call]
                    self.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=f"gpuworkers.dev/pool={self.pool}",
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=3600,
                )
                for event in stream:
                    pod, now = event["object"], time.monotonic()
                    if event["type"] == "DELETED":
                        self.gone.setdefault(pod.metadata.name, now)
                    elif event["type"] != "ERROR" and pod.spec.node_name:
                        self.bound.setdefault(pod.metadata.name, now)
            except (urllib3.exceptions.HTTPError, client.ApiException, AttributeError):
                time.sleep(0.1)  # AttributeError: an ERROR event's Status object

    def stop(self) -> None:
        self.running = False
        self._watch.stop()  # type: ignore[no-untyped-call]


class LimitClock(threading.Thread):
    """Poll Prefect for the pool's limits; note when each appears and disappears."""

    def __init__(self, api_url: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.api_url, self.prefix = api_url, prefix
        self.appeared: dict[str, float] = {}
        self.vanished: dict[str, float] = {}
        self.running = True

    def _names(self, http: httpx.Client) -> set[str]:
        """Every limit's name, in pages of 200 (the API's largest)."""
        names: set[str] = set()
        offset = 0
        while True:
            page = http.post(
                f"{self.api_url}/v2/concurrency_limits/filter",
                json={"limit": 200, "offset": offset},
            ).json()
            names |= {i["name"].removeprefix(self.prefix) for i in page
                      if i["name"].startswith(self.prefix)}  # fmt: skip
            if len(page) < 200:
                return names
            offset += 200

    def run(self) -> None:
        seen: set[str] = set()
        with httpx.Client(timeout=30) as http:
            while self.running:
                names = self._names(http)
                now = time.monotonic()
                for pod in names - seen:
                    self.appeared.setdefault(pod, now)
                for pod in seen - names:
                    self.vanished.setdefault(pod, now)
                seen = names
                # Every 50 ms; every second once a look takes pages of 200
                # limits, so that the clock does not load the Prefect server the
                # operator is timed on (the figures are then +-1 s).
                time.sleep(0.05 if len(names) < 200 else 1.0)


def wait(what: str, probe: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


def measure(cluster: DevCluster, pods: int, workdir: Path) -> dict[str, Any]:
    namespace = f"bench-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", namespace)
    install_crd(cluster)
    group = f"bench-{uuid.uuid4().hex[:4]}"
    node_names = [f"{group}-{i}" for i in range((pods + 63) // 64)]
    for name in node_names:
        cluster.add_node(name, gpus=64, labels={"pgw-bench": group},
                         resources={"pods": "200"})  # fmt: skip
    # PostgreSQL, as a production server: on SQLite concurrent deletes queue on its lock.
    server = LocalPrefectServer(home=workdir / "prefect", database="postgres").start(timeout_s=600)
    operator = OperatorProcess(
        cluster.kubeconfig, namespace, workdir / "operator.log", metrics_port=free_port()
    ).start()
    pools = Pools(cluster, namespace)
    pod_clock = PodClock(pools.core, namespace, "bench")
    limit_clock = LimitClock(server.api_url, "gpu:")
    try:
        wait("ServiceAccount default", lambda: cluster.kubectl(
            "-n", namespace, "get", "sa", "default", check=False).returncode == 0, 30)  # fmt: skip
        pools.create("bench", {
            "replicas": 0,
            "workPool": {"name": "bench"},
            "prefect": {"apiUrl": server.api_url},
            "gpu": {"perWorker": 1},
            "worker": {"image": "registry.invalid/worker:bench", "drainGracePeriodSeconds": 0,
                       "podTemplate": {"nodeSelector": {"pgw-bench": group}}},
        })  # fmt: skip
        pod_clock.start()
        limit_clock.start()
        started = time.monotonic()
        print(f"scaling 0 -> {pods} ...", flush=True)
        pools.scale("bench", pods)
        wait(f"{pods} limits", lambda: len(limit_clock.appeared) >= pods, 1800)
        scale_up_s = time.monotonic() - started
        # The write-ahead ledger lives in the pool's status: how big at full size
        # (etcd refuses objects over 1.5 MiB).
        pool_bytes = len(json.dumps(pools.get("bench")))
        status_bytes = len(json.dumps(pools.get("bench").get("status") or {}))
        print(f"scaling {pods} -> 0 ...", flush=True)
        started = time.monotonic()
        pools.scale("bench", 0)
        wait("all limits gone", lambda: len(limit_clock.vanished) >= pods, 1800)
        scale_down_s = time.monotonic() - started
        operator.assert_alive()
        # How many reconcile passes it took, and how long one lasted on average.
        samples = operator.metrics()
        passes = samples.get(
            f'pgw_reconcile_duration_seconds_count{{namespace="{namespace}",pool="bench"}}', 0
        )
        pass_s = samples.get(
            f'pgw_reconcile_duration_seconds_sum{{namespace="{namespace}",pool="bench"}}', 0
        )
    finally:
        limit_clock.running = False
        pod_clock.stop()
        operator.stop()
        server.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        for name in node_names:
            cluster.remove_node(name)

    to_limit = [limit_clock.appeared[p] - t for p, t in pod_clock.bound.items()
                if p in limit_clock.appeared]  # fmt: skip
    to_gone = [limit_clock.vanished[p] - t for p, t in pod_clock.gone.items()
               if p in limit_clock.vanished]  # fmt: skip
    return {
        "pods": pods,
        "bound_to_limit_p50_s": statistics.median(to_limit),
        "bound_to_limit_p95_s": percentile(to_limit, 0.95),
        "bound_to_limit_max_s": max(to_limit),
        "deleted_to_limit_gone_p50_s": statistics.median(to_gone),
        "deleted_to_limit_gone_p95_s": percentile(to_gone, 0.95),
        "deleted_to_limit_gone_max_s": max(to_gone),
        "samples_bound": len(to_limit),
        "samples_deleted": len(to_gone),
        "scale_up_all_limits_s": scale_up_s,
        "scale_down_all_limits_gone_s": scale_down_s,
        "pool_object_bytes_at_full_size": pool_bytes,
        "pool_status_bytes_at_full_size": status_bytes,
        "reconcile_passes": passes,
        "reconcile_pass_mean_s": pass_s / passes if passes else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=60)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    up = run([DEV_CLUSTER, "up"], timeout=3600)
    if up.returncode != 0:
        raise SystemExit(f"hack/dev-cluster up failed:\n{up.stderr}")
    kubectl = Path(run([BUILD_TOOLS, "kubernetes"]).stdout.strip().splitlines()[-1]) / "kubectl"
    cluster = DevCluster(Path(up.stdout.strip().splitlines()[-1]), kubectl, started_here=False)
    with tempfile.TemporaryDirectory(prefix="pgw-bench-") as tmp:
        result = measure(cluster, args.pods, Path(tmp))
    if args.json:
        print(json.dumps(result))
        return
    print(f"\noperator latency over {result['pods']} pods (dev control plane, this machine)")
    print(f"{'':28}{'median':>9}{'p95':>9}{'max':>9}")
    for label, key in (("pod bound -> limit present", "bound_to_limit"),
                       ("pod deleted -> limit gone", "deleted_to_limit_gone")):  # fmt: skip
        row = [result[f"{key}_{q}_s"] for q in ("p50", "p95", "max")]
        print(f"{label:28}" + "".join(f"{v:8.2f}s" for v in row))
    print(f"scale 0->{result['pods']}: all limits in {result['scale_up_all_limits_s']:.1f}s; "
          f"back to 0: all gone in {result['scale_down_all_limits_gone_s']:.1f}s")  # fmt: skip
    object_kib = result["pool_object_bytes_at_full_size"] / 1024
    status_kib = result["pool_status_bytes_at_full_size"] / 1024
    print(f"reconcile passes: {result['reconcile_passes']:.0f}, "
          f"{result['reconcile_pass_mean_s'] or 0:.2f} s each on average")  # fmt: skip
    print(f"pool object at {result['pods']} pods: {object_kib:.0f} KiB "
          f"(status {status_kib:.0f} KiB; etcd refuses over 1536 KiB)")  # fmt: skip


if __name__ == "__main__":
    main()
