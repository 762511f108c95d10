"""Benchmark: how fast a pod's limit follows the pod, and what each pod costs, on the
dev control plane.

    hack/dev-cluster up && .venv/bin/python -m tests.cluster.k8s.bench_operator_latency \
        [--pods 60 1000] [--pools 100x10 3x1000] [--failover 200] [--json]

Starts a real Prefect server (on the embedded PostgreSQL) and, per scenario, a
fresh operator (as a subprocess, as in its container), scales GpuWorkerPools
from 0 to N on fresh fake nodes and back, and records, on this machine's clock:
- bound -> limit: from the watch event that shows the pod bound to a node to
  the first poll (every 50 ms) that finds ``gpu:<pod>`` in Prefect;
- deleted -> limit gone: from the watch event that shows the pod gone from the
  API server to the first poll that no longer finds its limit;
- all limits after the last pod bound, the scale's total times;
- per pod: the operator's Kubernetes and Prefect requests (its own counters),
  its CPU seconds (/proc), and its peak memory.
Scenarios: one pool of N pods (``--pods``, at most 1000: a pool's limit), P
pools of N pods scaled at once (``--pools PxN``), and a failover
(``--failover N``): two replicas with leader election (15/10/2 s), the leader
SIGKILLed while a pool scales 0 -> N.
Prints one table and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import urllib3
from kubernetes import client, watch

from prefect_gpu_workers.server import LocalPrefectServer, free_port

from .cluster import BUILD_TOOLS, DEV_CLUSTER, DevCluster, run
from .operator_harness import (
    OperatorProcess,
    Pools,
    install_crd,
    leader_election_args,
    lease_holder,
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class PodClock(threading.Thread):
    """Watch the pool's pods; note when each is bound and when it is gone."""

    def __init__(self, core: client.CoreV1Api, namespace: str, selector: str) -> None:
        super().__init__(daemon=True)
        self.core, self.namespace, self.selector = core, namespace, selector
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
                    self.namespace, label_selector=self.selector
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
                    label_selector=self.selector,
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

    def seen_names(self) -> set[str]:
        """The pods whose limits exist now (by the last look)."""
        return set(self.appeared) - set(self.vanished)

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
        time.sleep(0.2)


def process_cost(pid: int) -> tuple[float, int]:
    """CPU seconds used so far and peak resident memory (bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak_kib = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    return cpu_s, peak_kib * 1024


# Components of the dev control plane and the bench, by process name (comm) or,
# for Python processes, a marker in their command line.
COMPONENTS = {
    "etcd": "etcd", "kube-apiserver": "kube-apiserver", "kube-controller": "controller-manager",
    "kube-scheduler": "scheduler", "kwok": "kwok", "postgres": "postgres",
}  # fmt: skip


def component_cpu(operators: list[int]) -> dict[str, float]:
    """CPU seconds used so far by each component on this machine (all its processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        if int(proc.name) in operators:
            name = "operator"
        elif "prefect server start" in args:
            name = "prefect"
        else:
            name = COMPONENTS.get(comm, "")
        if name:
            used[name] = used.get(name, 0.0) + cpu
    return used


def cpu_per_pod(before: dict[str, float], after: dict[str, float], pods: int) -> dict[str, float]:
    """CPU milliseconds per pod of each component between two samples."""
    return {name: 1000 * (after.get(name, 0.0) - used) / pods for name, used in before.items()}


@dataclass
class Meter:
    """The operator's counters at one moment: requests by kind, CPU seconds."""

    kubernetes: float
    prefect: float
    cpu_s: float

    @classmethod
    def read(cls, operator: OperatorProcess) -> Meter:
        samples = operator.metrics()
        kube = sum(v for k, v in samples.items()
                   if k.startswith("pgw_operator_kubernetes_requests_total{"))  # fmt: skip
        prefect = sum(v for k, v in samples.items()
                      if k.startswith("pgw_operator_prefect_requests_total{"))  # fmt: skip
        assert operator._proc is not None
        return cls(kube, prefect, process_cost(operator._proc.pid)[0])

    def per_pod(self, later: Meter, pods: int) -> dict[str, float]:
        return {
            "kubernetes_requests_per_pod": (later.kubernetes - self.kubernetes) / pods,
            "prefect_requests_per_pod": (later.prefect - self.prefect) / pods,
            "cpu_ms_per_pod": 1000 * (later.cpu_s - self.cpu_s) / pods,
        }


def pool_body(server_url: str, group: str) -> dict[str, Any]:
    return {
        "replicas": 0,
        "workPool": {"name": "bench"},
        "prefect": {"apiUrl": server_url},
        "gpu": {"perWorker": 1},
        "worker": {"image": "registry.invalid/worker:bench", "drainGracePeriodSeconds": 0,
                   "podTemplate": {"nodeSelector": {"pgw-bench": group}}},
    }  # fmt: skip


def latencies(pod_clock: PodClock, limit_clock: LimitClock) -> dict[str, Any]:
    to_limit = [limit_clock.appeared[p] - t for p, t in pod_clock.bound.items()
                if p in limit_clock.appeared]  # fmt: skip
    to_gone = [limit_clock.vanished[p] - t for p, t in pod_clock.gone.items()
               if p in limit_clock.vanished]  # fmt: skip
    result: dict[str, Any] = {"samples_bound": len(to_limit), "samples_deleted": len(to_gone)}
    for key, values in (("bound_to_limit", to_limit), ("deleted_to_limit_gone", to_gone)):
        if values:
            result[f"{key}_p50_s"] = statistics.median(values)
            result[f"{key}_p95_s"] = percentile(values, 0.95)
            result[f"{key}_max_s"] = max(values)
    return result


@dataclass
class Bench:
    cluster: DevCluster
    server: LocalPrefectServer
    workdir: Path

    def scenario(self, name: str, pools: int, pods: int, failover: bool = False) -> dict[str, Any]:
        """Scale ``pools`` pools from 0 to ``pods`` pods each and back; with
        ``failover``, two operator replicas and the leader killed on the way up."""
        cluster, total = self.cluster, pools * pods
        namespace = f"bench-{uuid.uuid4().hex[:5]}"
        cluster.kubectl("create", "namespace", namespace)
        group = f"bench-{uuid.uuid4().hex[:4]}"
        node_names = [f"{group}-{i}" for i in range((total + 63) // 64)]
        for node in node_names:
            cluster.add_node(node, gpus=64, labels={"pgw-bench": group},
                             resources={"pods": "200"})  # fmt: skip
        replicas = 2 if failover else 1
        operators = [
            OperatorProcess(
                cluster.kubeconfig, namespace, self.workdir / f"{name}-operator-{i}.log",
                metrics_port=free_port(),
                extra_args=(*OperatorProcess.extra_args,
                            *(leader_election_args(namespace, f"op-{i}", "bench", (15, 10, 2))
                              if failover else ())),
            )
            for i in range(replicas)
        ]  # fmt: skip
        handle = Pools(cluster, namespace)
        prefix = "gpu:"
        pod_clock = PodClock(handle.core, namespace, "gpuworkers.dev/pool")
        limit_clock = LimitClock(self.server.api_url, prefix)
        names = [f"bench-{i}" for i in range(pools)]
        result: dict[str, Any] = {"scenario": name, "pools": pools, "pods": total}
        try:
            for operator in operators:
                operator.start()
                time.sleep(1.0)  # the first one started leads
            has_account = lambda: cluster.kubectl(  # noqa: E731
                "-n", namespace, "get", "sa", "default", check=False).returncode == 0  # fmt: skip
            wait("ServiceAccount default", has_account, 30)
            for pool in names:
                handle.create(pool, pool_body(self.server.api_url, group))
            leader = operators[0]
            if failover:
                wait("a leader", lambda: lease_holder(cluster, namespace, "bench") == "op-0", 60)
            time.sleep(3.0)  # the pools' first passes
            pod_clock.start()
            limit_clock.start()
            before = Meter.read(leader)
            pids = [o._proc.pid for o in operators if o._proc is not None]
            machine_before = component_cpu(pids)
            load_before = os.getloadavg()[0]
            started = time.monotonic()
            print(f"[{name}] scaling 0 -> {total} ...", flush=True)
            for pool in names:
                handle.scale(pool, pods)
            if failover:
                wait(
                    "a quarter of the limits", lambda: len(limit_clock.appeared) >= total // 4, 600
                )
                killed_at = time.monotonic()
                leader.kill()
                seen_then = set(limit_clock.appeared)
                print(f"[{name}] leader killed with {len(seen_then)} limits", flush=True)
                wait("the standby to lead",
                     lambda: lease_holder(cluster, namespace, "bench") == "op-1", 120)  # fmt: skip
                taken_at = time.monotonic()
                result["failover_lease_taken_s"] = taken_at - killed_at
                # The standby's own first limit: the first to appear after it leads
                # (one appearing sooner was the killed leader's last call landing).
                appeared = limit_clock.appeared
                wait("the standby's first limit",
                     lambda: any(t >= taken_at for t in appeared.values()), 120)  # fmt: skip
                first_new = min(t for t in limit_clock.appeared.values() if t >= taken_at)
                result["failover_standby_acts_s"] = first_new - killed_at
                leader = operators[1]
            wait(f"{total} limits", lambda: len(limit_clock.appeared) >= total, 1800)
            up_done = time.monotonic()
            result["scale_up_all_limits_s"] = up_done - started
            last_bound = max(pod_clock.bound.values())
            result["all_limits_after_last_bound_s"] = (
                max(limit_clock.appeared.values()) - last_bound
            )
            result["machine_cpu_ms_per_pod_up"] = cpu_per_pod(
                machine_before, component_cpu(pids), total
            )
            result["load_before"] = load_before
            time.sleep(1.0)
            if not failover:
                up = Meter.read(leader)
                result.update({f"up_{k}": v for k, v in before.per_pod(up, total).items()})
            pool_status = handle.get(names[0]).get("status") or {}
            result["pool_status_bytes"] = len(json.dumps(pool_status))
            result["worker_limit_objects"] = sum(len(handle.worker_limits(p)) for p in names)
            result["limits_in_prefect"] = len(limit_clock.seen_names())
            print(f"[{name}] scaling {total} -> 0 ...", flush=True)
            down_from = Meter.read(leader)
            machine_before = component_cpu(pids)
            started = time.monotonic()
            for pool in names:
                handle.scale(pool, 0)
            wait("all limits gone", lambda: len(limit_clock.vanished) >= total, 1800)
            result["scale_down_all_limits_gone_s"] = time.monotonic() - started
            result["machine_cpu_ms_per_pod_down"] = cpu_per_pod(
                machine_before, component_cpu(pids), total
            )
            time.sleep(1.0)
            down = Meter.read(leader)
            result.update({f"down_{k}": v for k, v in down_from.per_pod(down, total).items()})
            assert leader._proc is not None
            result["operator_peak_rss_mib"] = process_cost(leader._proc.pid)[1] / 2**20
            samples = leader.metrics()
            passes = sum(v for k, v in samples.items()
                         if k.startswith("pgw_reconcile_duration_seconds_count{"))  # fmt: skip
            pass_s = sum(v for k, v in samples.items()
                         if k.startswith("pgw_reconcile_duration_seconds_sum{"))  # fmt: skip
            result["reconcile_passes"] = passes
            result["reconcile_pass_mean_s"] = pass_s / passes if passes else None
            leader.assert_alive()
        finally:
            limit_clock.running = False
            pod_clock.stop()
            for operator in operators:
                operator.stop()
            cluster.kubectl("delete", "namespace", namespace, "--wait=false")
            for node in node_names:
                cluster.remove_node(node)
        result.update(latencies(pod_clock, limit_clock))
        return result


def table(results: list[dict[str, Any]]) -> str:
    """One row per scenario: latencies, totals, cost per pod."""
    rows = [("scenario", "bound->limit p50/p95/max s", "deleted->gone p50/p95/max s",
             "last bound->all s", "k8s req/pod up/down", "Prefect req/pod up/down",
             "CPU ms/pod up/down", "peak MiB")]  # fmt: skip

    def trio(r: dict[str, Any], key: str) -> str:
        return "/".join(f"{r.get(f'{key}_{q}_s', float('nan')):.2f}" for q in ("p50", "p95", "max"))

    def pair(r: dict[str, Any], key: str) -> str:
        return "/".join(f"{r.get(f'{d}_{key}', float('nan')):.1f}" for d in ("up", "down"))

    for r in results:
        rows.append((
            f"{r['scenario']} ({r['pods']} pods)", trio(r, "bound_to_limit"),
            trio(r, "deleted_to_limit_gone"), f"{r['all_limits_after_last_bound_s']:.2f}",
            pair(r, "kubernetes_requests_per_pod"), pair(r, "prefect_requests_per_pod"),
            pair(r, "cpu_ms_per_pod"), f"{r.get('operator_peak_rss_mib', 0):.0f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    for r in results:
        if "failover_lease_taken_s" in r:
            lines.append(
                f"failover: lease taken {r['failover_lease_taken_s']:.1f} s after the leader's "
                f"SIGKILL, standby's first limit {r['failover_standby_acts_s']:.1f} s after; "
                f"{r['worker_limit_objects']} objects, {r['limits_in_prefect']} limits for "
                f"{r['pods']} pods"
            )
    for r in results:
        for way in ("up", "down"):
            used = r.get(f"machine_cpu_ms_per_pod_{way}") or {}
            shares = ", ".join(f"{k} {v:.1f}" for k, v in sorted(used.items(), key=lambda i: -i[1]))
            lines.append(f"{r['scenario']} ({r['pods']} pods), CPU ms per pod ({way}): {shares}")
        lines.append(f"{r['scenario']}: {r.get('reconcile_passes', 0):.0f} passes, "
                     f"{r.get('reconcile_pass_mean_s') or 0:.3f} s each; pool status "
                     f"{r['pool_status_bytes']} bytes")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, nargs="*", default=[60],
                        help="one pool of each size, in turn")  # fmt: skip
    parser.add_argument("--pools", nargs="*", default=[], metavar="PxN",
                        help="P pools of N pods (at most 1000 each) scaled at once")  # fmt: skip
    parser.add_argument("--failover", type=int, default=0, metavar="N",
                        help="leader killed as a pool scales 0 -> N")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    up = run([DEV_CLUSTER, "up"], timeout=3600)
    if up.returncode != 0:
        raise SystemExit(f"hack/dev-cluster up failed:\n{up.stderr}")
    kubectl = Path(run([BUILD_TOOLS, "kubernetes"]).stdout.strip().splitlines()[-1]) / "kubectl"
    cluster = DevCluster(Path(up.stdout.strip().splitlines()[-1]), kubectl, started_here=False)
    install_crd(cluster)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pgw-bench-") as tmp:
        workdir = Path(tmp)
        # PostgreSQL, as a production server: on SQLite concurrent deletes queue on its lock.
        server = LocalPrefectServer(home=workdir / "prefect", database="postgres")
        server.start(timeout_s=600)
        try:
            bench = Bench(cluster, server, workdir)
            for pods in args.pods:
                results.append(bench.scenario("one pool", 1, pods))
            for shape in args.pools:
                count, size = (int(part) for part in shape.split("x"))
                results.append(bench.scenario(f"{count} pools of {size}", count, size))
            if args.failover:
                results.append(bench.scenario("failover", 1, args.failover, failover=True))
        finally:
            server.stop()
    if args.json:
        print(json.dumps(results))
        return
    print(f"\noperator per pod (dev control plane, this machine, load {os.getloadavg()[0]:.1f})")
    print(table(results))


if __name__ == "__main__":
    main()
