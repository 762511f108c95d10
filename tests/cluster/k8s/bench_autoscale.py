"""Benchmark: how fast backlog autoscaling reacts, on the dev control plane.

    hack/bench-autoscale [--runs 30] [--poll 5] [--delay 30] [--json]

Starts a real Prefect server and the operator (a subprocess, as in its
container), creates an autoscaled GpuWorkerPool at zero replicas, then:
- scale_up_decision_s: from the first of ``--runs`` flow runs created in the
  work pool (the backlog appears) to the first poll (every 100 ms) that finds
  the pool's replicas raised;
- scale_to_zero_s: from the last of those runs deleted (the backlog is gone)
  to the first poll that finds replicas 0. It includes scaleDownDelaySeconds
  (``--delay``) by design, counted from the last backlog read that still saw
  the higher need, which may fall while the runs are being deleted
  (``deleting_runs_s``): so it can come out a little under the delay.
No worker runs in that part (kwok plays the kubelet), so the runs stay queued.

Then a second pool whose pods run as local processes (``LocalKubelet``), real
workers running the pipeline (simulated GPU steps):
- first_gpu_step_from_zero_s: from ``--real-runs`` runs created with the pool
  at zero replicas to the first GPU step that takes its slot (scale-up, pod
  start, worker start-up, flow-run start-up, download included);
- runs_lost_on_busy_scale_down: with every worker busy, ``maxReplicas`` is
  lowered to 1, so the operator scales the pool down under load; the runs
  that did not end Completed. ``drained_s`` is how long the stopped worker
  drained, and its report line is printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_gpu_workers.server import LocalPrefectServer

from .bench_operator_latency import wait
from .cluster import BUILD_TOOLS, DEV_CLUSTER, DevCluster, run
from .local_kubelet import LocalKubelet
from .operator_harness import OperatorProcess, Pools, install_crd


class ReplicaClock(threading.Thread):
    """Poll the pool's spec.replicas every 100 ms; note when each value is first seen."""

    def __init__(self, pools: Pools, pool: str) -> None:
        super().__init__(daemon=True)
        self.pools, self.pool = pools, pool
        self.changes: list[tuple[float, int]] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            replicas = int(self.pools.get(self.pool)["spec"].get("replicas", 0))
            if not self.changes or self.changes[-1][1] != replicas:
                self.changes.append((time.monotonic(), replicas))
            time.sleep(0.1)

    def first(self, after: float, test: Any) -> float | None:
        return next((t for t, n in self.changes if t >= after and test(n)), None)


def measure(
    cluster: DevCluster, runs: int, poll_s: int, delay_s: int, workdir: Path, real_runs: int = 4
) -> dict[str, Any]:
    namespace = f"bench-as-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", namespace)
    install_crd(cluster)
    group = f"bench-as-{uuid.uuid4().hex[:4]}"
    cluster.add_node(f"{group}-0", gpus=64, labels={"pgw-bench": group})
    server = LocalPrefectServer(home=workdir / "prefect").start(timeout_s=600)
    operator = OperatorProcess(cluster.kubeconfig, namespace, workdir / "operator.log").start()
    pools = Pools(cluster, namespace)
    clock = ReplicaClock(pools, "bench")
    work_pool = f"bench-{uuid.uuid4().hex[:5]}"
    try:
        wait("ServiceAccount default", lambda: cluster.kubectl(
            "-n", namespace, "get", "sa", "default", check=False).returncode == 0, 30)  # fmt: skip
        pools.create("bench", {
            "replicas": 0,
            "workPool": {"name": work_pool, "flowRunsPerWorker": 10},
            "prefect": {"apiUrl": server.api_url},
            "gpu": {"perWorker": 1},
            "worker": {"image": "registry.invalid/worker:bench", "drainGracePeriodSeconds": 0,
                       "podTemplate": {"nodeSelector": {"pgw-bench": group}}},
            "autoscaling": {"minReplicas": 0, "maxReplicas": 64, "pollIntervalSeconds": poll_s,
                            "scaleDownDelaySeconds": delay_s},
        })  # fmt: skip
        wait("the first autoscaling decision", lambda: (
            (pools.get("bench").get("status") or {}).get("autoscaling")), 300)  # fmt: skip
        clock.start()
        with (
            temporary_settings(updates={PREFECT_API_URL: server.api_url}),
            get_client(sync_client=True) as prefect,
        ):
            flow_id = prefect.create_flow_from_name("bench-autoscale")
            deployment_id = prefect.create_deployment(flow_id, "bench", work_pool_name=work_pool)
            print(f"creating {runs} runs ...", flush=True)
            run_ids = [prefect.create_flow_run_from_deployment(deployment_id).id]
            backlog_at = time.monotonic()
            run_ids += [prefect.create_flow_run_from_deployment(deployment_id).id
                        for _ in range(runs - 1)]  # fmt: skip
            wanted = (runs + 9) // 10
            wait(f"replicas {wanted}", lambda: clock.first(backlog_at, lambda n: n >= wanted), 600)
            raised_at = clock.first(backlog_at, lambda n: n > 0)
            all_at = clock.first(backlog_at, lambda n: n >= wanted)
            print("deleting the runs ...", flush=True)
            deleting_at = time.monotonic()
            for run_id in run_ids:
                prefect.delete_flow_run(run_id)
            gone_at = time.monotonic()
        wait("replicas 0", lambda: clock.first(gone_at, lambda n: n == 0), delay_s + 600)
        zero_at = clock.first(gone_at, lambda n: n == 0)
        real = measure_real_workers(pools, server, group, real_runs, workdir) if real_runs else {}
        operator.assert_alive()
    finally:
        clock.running = False
        operator.stop()
        server.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        cluster.remove_node(f"{group}-0")
    assert raised_at is not None
    assert all_at is not None
    assert zero_at is not None
    return {
        "runs": runs,
        "poll_interval_s": poll_s,
        "scale_down_delay_s": delay_s,
        "replicas_for_backlog": wanted,
        "scale_up_decision_s": raised_at - backlog_at,
        "scale_up_to_all_replicas_s": all_at - backlog_at,
        "deleting_runs_s": gone_at - deleting_at,
        "scale_to_zero_s": zero_at - gone_at,
        "scale_to_zero_overhead_s": zero_at - gone_at - delay_s,
        **real,
    }


def measure_real_workers(
    pools: Pools, server: LocalPrefectServer, group: str, runs: int, workdir: Path
) -> dict[str, Any]:
    """Real workers from zero, then a scale-down while they are busy (see the module doc)."""
    from pgw_flows.deploy import deploy_pipeline
    from prefect_gpu_workers.local.prefect_ops import read_runs, submit_runs
    from prefect_gpu_workers.records import read_records

    work_pool = f"bench-real-{uuid.uuid4().hex[:5]}"
    per_worker = max(1, runs // 2)  # two workers for the runs
    pools.create("real", {
        "replicas": 0,
        "workPool": {"name": work_pool, "flowRunsPerWorker": per_worker},
        "prefect": {"apiUrl": server.api_url},
        "gpu": {"perWorker": 1, "slotsPerGpu": 2},
        "worker": {"image": "registry.invalid/worker:bench", "drainGracePeriodSeconds": 120,
                   "podTemplate": {"nodeSelector": {"pgw-bench": group}, "env": [
                       {"name": "PREFECT_WORKER_QUERY_SECONDS", "value": "1"}]}},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "pollIntervalSeconds": 2,
                        "scaleDownDelaySeconds": 5, "cooldownSeconds": 0},
    })  # fmt: skip
    kubelet = LocalKubelet(pools, "real", workdir / "pods").start()
    records = workdir / "records"
    params = {"items": 1, "simulate": True, "download_s": 1.0, "gpu_s": 10.0, "save_s": 1.0,
              "record_dir": str(records)}  # fmt: skip
    try:
        with (
            temporary_settings(updates={PREFECT_API_URL: server.api_url}),
            get_client(sync_client=True) as prefect,
        ):
            deployment_id = deploy_pipeline(work_pool, name="bench-real", parameters=params)
            print(f"real workers: {runs} runs into a pool at zero ...", flush=True)
            submitted_at = time.time()
            run_ids = submit_runs(prefect, deployment_id, runs, params)

            def first_gpu_step() -> float | None:
                starts = [r.start for r in read_records(records) if r.stage == "gpu"]
                return min(starts) if starts else None

            wait("the first GPU step", lambda: first_gpu_step() is not None, 600)
            first_gpu = first_gpu_step()
            assert first_gpu is not None

            def busy() -> bool:
                kinds = [r.state.type.value for r in read_runs(prefect, run_ids) if r.state]
                in_flight = sum(kind in ("PENDING", "RUNNING") for kind in kinds)
                return (
                    "SCHEDULED" not in kinds
                    and in_flight > per_worker
                    and (len(kubelet.running()) == 2)
                )

            wait("both workers busy", busy, 600)
            print("scaling down under load (maxReplicas 2 -> 1) ...", flush=True)
            pools.patch_spec("real", {"autoscaling": {"maxReplicas": 1}})
            wait("a worker told to stop", lambda: len(kubelet.running()) < 2, 120)

            def all_final() -> bool:
                found = read_runs(prefect, run_ids)
                return all(r.state is not None and r.state.is_final() for r in found)

            wait("every run to end", all_final, 900)
            kinds = [r.state.type.value for r in read_runs(prefect, run_ids) if r.state]
        stopped = [c for c in kubelet.containers.values() if c.term_at is not None]
        wait("the stopped worker to exit", lambda: all(c.proc.poll() is not None for c in stopped),
             180)  # fmt: skip
        drained = [line for c in stopped for line in c.log().splitlines() if "drained in" in line]
        for line in drained:
            print(f"  stopped worker: {line.strip()}", flush=True)
    finally:
        kubelet.stop()
        pools.delete("real")
    return {
        "real_runs": runs,
        "first_gpu_step_from_zero_s": first_gpu - submitted_at,
        "runs_lost_on_busy_scale_down": sum(kind != "COMPLETED" for kind in kinds),
        "stopped_worker_exit_codes": [c.proc.returncode for c in stopped],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--poll", type=int, default=5, help="autoscaling.pollIntervalSeconds")
    parser.add_argument("--delay", type=int, default=30, help="autoscaling.scaleDownDelaySeconds")
    parser.add_argument(
        "--real-runs", type=int, default=4,
        help="runs for the real-worker part (0 skips it): from zero, then a busy scale-down",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    up = run([DEV_CLUSTER, "up"], timeout=3600)
    if up.returncode != 0:
        raise SystemExit(f"hack/dev-cluster up failed:\n{up.stderr}")
    kubectl = Path(run([BUILD_TOOLS, "kubernetes"]).stdout.strip().splitlines()[-1]) / "kubectl"
    cluster = DevCluster(Path(up.stdout.strip().splitlines()[-1]), kubectl, started_here=False)
    with tempfile.TemporaryDirectory(prefix="pgw-bench-") as tmp:
        result = measure(cluster, args.runs, args.poll, args.delay, Path(tmp), args.real_runs)
    if args.json:
        print(json.dumps(result))
        return
    print(f"\nbacklog autoscaling, {result['runs']} runs (dev control plane, this machine)")
    print(
        f"  backlog appears -> replicas raised:   {result['scale_up_decision_s']:6.2f} s "
        f"(poll {result['poll_interval_s']} s)"
    )
    print(
        f"  backlog appears -> {result['replicas_for_backlog']} replicas:          "
        f"{result['scale_up_to_all_replicas_s']:6.2f} s"
    )
    print(
        f"  backlog gone -> replicas 0:           {result['scale_to_zero_s']:6.2f} s "
        f"(delay {result['scale_down_delay_s']} s + {result['scale_to_zero_overhead_s']:.2f} s)"
    )
    if "first_gpu_step_from_zero_s" in result:
        print(f"\nreal workers, {result['real_runs']} runs (pods as local processes)")
        first, lost = result["first_gpu_step_from_zero_s"], result["runs_lost_on_busy_scale_down"]
        print(f"  runs created at zero -> first GPU step: {first:6.2f} s")
        print(f"  runs lost on a busy scale-down:         {lost:6d}")


if __name__ == "__main__":
    main()
