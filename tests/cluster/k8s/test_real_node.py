"""The project's images on the dev cluster's real node: a kubelet, containerd and
runc run the worker image as the operator configures it, against a real Prefect.

What kwok cannot show and these tests do: containers that start from the
images built by hack/build-images, as uid 10001 on a read-only root
filesystem; probes that run; a killed container that the kubelet restarts;
SIGTERM and the grace period of a pod being deleted.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, watch
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel

from pgw_flows.deploy import deploy_pipeline
from pgw_operator.desired import WORKER_UID
from prefect_gpu_workers.local.prefect_ops import read_runs, submit_runs
from prefect_gpu_workers.records import StageRecord, read_records
from prefect_gpu_workers.report import gpu_overlap_per_worker

from .cluster import DevCluster
from .node_workers import POD_RECORDS, NodeWorkers, run_params, wait_until_final, worker_status
from .operator_harness import Pools, unique, wait_until
from .real_node import Image, RealNode


def pod_records(node: RealNode, pools: Pools, pods: list[str]) -> list[StageRecord]:
    """The stage records the flows wrote in each pod's /tmp, read on this machine."""
    records: list[StageRecord] = []
    for pod in pods:
        meta = pools.core.read_namespaced_pod(pod, pools.namespace).metadata
        assert meta is not None
        tmp = node.empty_dir(str(meta.uid), "tmp")
        records += read_records(tmp / Path(POD_RECORDS).relative_to("/tmp"))
    return records


# --- the images ---------------------------------------------------------------------


def run_to_end(pools: Pools, node: RealNode, name: str, image: Image, command: list[str]) -> str:
    """Run ``command`` in ``image`` on the real node as the chart runs containers; its log."""
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            **node.placement(),
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            # The image's own USER: runAsNonRoot makes the kubelet check it is not 0.
            "securityContext": {"runAsNonRoot": True},
            "containers": [{
                "name": "main", "image": image.ref, "imagePullPolicy": "Never",
                "command": command,
                "securityContext": {"readOnlyRootFilesystem": True,
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }  # fmt: skip
    pools.cluster.kubectl("-n", pools.namespace, "create", "-f", "-", input=json.dumps(pod))

    def ended() -> str | None:
        status = pools.core.read_namespaced_pod(name, pools.namespace).status
        phase = status.phase if status else None
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_until(ended, f"pod {name} to end", timeout=180)
    log = str(pools.core.read_namespaced_pod_log(name, pools.namespace))
    assert phase == "Succeeded", log
    return log


def test_both_images_run_as_their_non_root_uid_on_a_read_only_root(
    dev_cluster: DevCluster, namespace: str, real_node: RealNode, project_images: dict[str, Image]
) -> None:
    pools = Pools(dev_cluster, namespace)
    probe = (
        "import importlib.util as u, os, sys\n"
        "try:\n    open('/probe', 'w')\nexcept OSError as e:\n    print('root fs:', e.strerror)\n"
        "print('uid', os.getuid(), sys.version.split()[0])\n"
        "print('has', sorted(m for m in ('prefect', 'torch', 'kopf', 'pgw_flows', "
        "'pgw_operator', 'prefect_gpu_workers') if u.find_spec(m)))\n"
    )
    worker = run_to_end(pools, real_node, "worker-probe", project_images["worker"],
                        ["python", "-c", probe])  # fmt: skip
    operator = run_to_end(pools, real_node, "operator-probe", project_images["operator"],
                          ["python", "-c", probe])  # fmt: skip
    for log in (worker, operator):
        assert "root fs: Read-only file system" in log
        assert f"uid {WORKER_UID} 3.11." in log
    # The worker image as the tests build it: Prefect and the flows, torch left out.
    assert "has ['pgw_flows', 'pgw_operator', 'prefect', 'prefect_gpu_workers']" in worker
    # The operator image: kopf, never Prefect or torch.
    assert "has ['kopf', 'pgw_flows', 'pgw_operator', 'prefect_gpu_workers']" in operator
    help_text = run_to_end(pools, real_node, "operator-help", project_images["operator"],
                           ["python", "-m", "pgw_operator", "--help"])  # fmt: skip
    assert "--namespace" in help_text
    sizes = {name: f"{image.size_bytes / 2**20:.0f} MiB" for name, image in project_images.items()}
    print("image archives (compressed layers):", sizes)


# --- the worker pods, end to end --------------------------------------------------


def test_worker_pods_on_a_real_node_hold_their_limits_and_leave_no_slot_held(
    node_workers: NodeWorkers, prefect: SyncPrefectClient
) -> None:
    pools, limits, real_node = node_workers.pools, node_workers.limits, node_workers.node
    work_pool, pods = node_workers.start("e2e", replicas=2, flow_runs=6)
    assert {limit["limit"] for limit in pods.values()} == {2}
    assert set(pools.running_pods("e2e").values()) == {real_node.name}
    # Each container started: the startup probe found the worker's health server.
    wait_until(
        lambda: all((s := worker_status(pools, p)) and s.ready for p in pods), "workers Ready", 180
    )

    params = run_params(records=True)
    deployment_id = deploy_pipeline(work_pool, name=unique("node-e2e"), parameters=params)
    runs = wait_until_final(prefect, submit_runs(prefect, deployment_id, 10, params))
    assert [r.state.type.value for r in runs if r.state] == ["COMPLETED"] * 10
    # Every GPU step waited at its pod's broker, which serves only its worker's
    # runs (the peer's PREFECT__FLOW_RUN_ID, read from /proc in the container):
    # none fell back to polling Prefect, which it says in the run's log.
    warnings = prefect.read_logs(
        log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs]),
            level=LogFilterLevel(ge_=30),
        ),
        limit=200,
    )
    assert not [w.message for w in warnings if "no slot broker" in w.message]
    # Prefect's own list: one worker per pod, named after it.
    assert {w.name for w in prefect.read_workers_for_work_pool(work_pool)} == set(pods)
    # No slot left held: each pod's limit, read from Prefect, is free.
    assert {p: (limits.get(f"gpu:{p}") or {}).get("active_slots") for p in pods} == dict.fromkeys(
        pods, 0
    )
    for pod in pods:
        status = worker_status(pools, pod)
        assert status is not None
        assert status.restart_count == 0, f"{pod} restarted"
        # Run as the operator configures every worker: uid 10001, read-only root.
        pod_spec = pools.core.read_namespaced_pod(pod, pools.namespace).spec
        assert pod_spec is not None
        assert pod_spec.security_context is not None
        assert pod_spec.security_context.run_as_user == WORKER_UID
        container_context = pod_spec.containers[0].security_context
        assert container_context is not None
        assert container_context.read_only_root_filesystem is True

    gpu_steps = [r for r in pod_records(real_node, pools, list(pods)) if r.stage == "gpu"]
    assert len(gpu_steps) == 10
    # Every pod ran GPU steps (at 6 flow runs per worker neither can take all 10),
    # each under the limit the operator made for it, up to and never beyond 2.
    assert {r.worker_id for r in gpu_steps} == set(pods)
    assert all(r.limit == f"gpu:{r.worker_id}" for r in gpu_steps)
    overlap = gpu_overlap_per_worker(gpu_steps)
    assert overlap == dict.fromkeys(pods, 2), overlap


def test_a_killed_worker_container_is_restarted_and_its_held_slots_come_back(
    node_workers: NodeWorkers, prefect: SyncPrefectClient
) -> None:
    pools, limits, real_node = node_workers.pools, node_workers.limits, node_workers.node
    work_pool, pods = node_workers.start("killed", replicas=1, flow_runs=4)
    (pod,) = pods
    limit = f"gpu:{pod}"
    before = limits.get(limit)
    assert before is not None

    params = run_params(records=False, gpu_s=120.0)  # still in the GPU step when killed
    deployment_id = deploy_pipeline(work_pool, name=unique("node-kill"), parameters=params)
    run_ids = submit_runs(prefect, deployment_id, 2, params)
    wait_until(lambda: (limits.get(limit) or {}).get("active_slots") == 2, "both slots held", 180)

    status = worker_status(pools, pod)
    assert status is not None
    assert status.container_id is not None
    killed_at = time.monotonic()
    real_node.kill(status.container_id.removeprefix("containerd://"))

    # The kubelet restarts the container; the operator sees the restart and
    # recreates the limit, which frees what the dead runs held.
    wait_until(lambda: (s := worker_status(pools, pod)) and s.restart_count == 1, "a restart", 120)
    recreated = wait_until(
        lambda: (
            (found := limits.get(limit))
            and found["id"] != before["id"]
            and found["active_slots"] == 0
            and found
        ),
        "the limit recreated with its slots free",
        timeout=120,
        interval=0.2,
    )
    recovered_s = time.monotonic() - killed_at
    print(f"killed mid-GPU-step: slots free again after {recovered_s:.1f} s (lease: 300 s)")
    assert recreated["limit"] == 2
    assert recovered_s < 300  # before the dead steps' leases would have expired
    # kopf posts events from a queue of its own: a moment after the recreation.
    wait_until(
        lambda: any(
            e.reason == "LimitRecreated" and "worker restarted (1)" in str(e.message)
            for e in pools.events("killed")
        ),
        "the LimitRecreated event names the restart",
        timeout=30,
        interval=0.2,
    )
    # The runs that died with the container are not left Running.
    runs = wait_until_final(prefect, run_ids, timeout=180)
    print("runs of the killed container:", [(r.state.type.value, r.state.name) for r in runs])
    assert all(r.state.type.value != "RUNNING" for r in runs)


def test_a_scale_down_sends_sigterm_and_the_worker_drains_within_its_grace(
    node_workers: NodeWorkers, prefect: SyncPrefectClient
) -> None:
    pools, limits = node_workers.pools, node_workers.limits
    # A drain of 75 - 15 = 60 s: far more than a run needs (about 12 s here).
    work_pool, pods = node_workers.start("drain", replicas=2, flow_runs=3, grace_s=75)
    logs = {pod: PodLog(pools, pod).start() for pod in pods}

    params = run_params(records=False, gpu_s=8.0, download_s=1.0, save_s=1.0)
    deployment_id = deploy_pipeline(work_pool, name=unique("node-drain"), parameters=params)
    run_ids = submit_runs(prefect, deployment_id, 6, params)

    def busy() -> bool:
        kinds = [r.state.type.value for r in read_runs(prefect, run_ids) if r.state]
        return "SCHEDULED" not in kinds and sum(k in ("PENDING", "RUNNING") for k in kinds) >= 4

    wait_until(busy, "both workers busy", timeout=300, interval=0.5)
    pools.scale("drain", 1)
    stopped = wait_until(
        lambda: next((p for p in pods if not pools.running_pods("drain").get(p)), None),
        "one worker told to stop",
        timeout=60,
    )
    runs = wait_until_final(prefect, run_ids)
    assert [r.state.type.value for r in runs if r.state] == ["COMPLETED"] * 6
    wait_until(lambda: stopped not in {p.metadata.name for p in pools.pods("drain") if p.metadata},
               "the drained pod gone", timeout=120)  # fmt: skip
    log = logs[stopped].text()
    drained = re.search(r"drained in [\d.]+ s: (\d+) finished, (\d+) rescheduled, "
                        r"(\d+) cancelled, (\d+) crashed", log)  # fmt: skip
    assert drained is not None, log[-3000:]
    finished, *stopped_runs = (int(n) for n in drained.groups())
    assert finished >= 1  # it was busy when the kubelet sent SIGTERM ...
    assert stopped_runs == [0, 0, 0]  # ... and every run it had finished where it began
    wait_until(lambda: logs[stopped].exit_code is not None, "its exit code seen", timeout=60)
    assert logs[stopped].exit_code == 0
    wait_until(lambda: limits.get(f"gpu:{stopped}") is None, "its limit deleted")


class PodLog:
    """Follows a pod's log from the API server (a deleted pod's log goes with it)
    and watches the pod until it is gone, keeping its container's exit code.

    The exit code comes from the watch, not from one read after the log ends:
    the kubelet writes the terminated state a moment after the container stops,
    and the pod may be deleted by the time anyone reads it; the watch sees every
    update, the deletion's last one included.
    """

    def __init__(self, pools: Pools, pod: str) -> None:
        self.pools, self.pod = pools, pod
        self.lines: list[str] = []
        self.exit_code: int | None = None
        self._threads = [
            threading.Thread(target=self._follow, daemon=True),
            threading.Thread(target=self._watch, daemon=True),
        ]

    def start(self) -> PodLog:
        for thread in self._threads:
            thread.start()
        return self

    def text(self) -> str:
        return "\n".join(self.lines)

    def _follow(self) -> None:
        stream: Any = self.pools.core.read_namespaced_pod_log(
            self.pod, self.pools.namespace, follow=True, _preload_content=False
        )  # an urllib3 response, not the str the stub says
        for line in stream.stream():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def _watch(self) -> None:
        watcher = watch.Watch()  # type: ignore[no-untyped-call]
        events = watcher.stream(  # type: ignore[no-untyped-call]
            self.pools.core.list_namespaced_pod,
            self.pools.namespace,
            field_selector=f"metadata.name={self.pod}",
            timeout_seconds=600,
        )
        try:
            for event in events:
                pod = event["object"]
                for status in (pod.status.container_statuses or []) if pod.status else []:
                    if status.state and status.state.terminated:
                        self.exit_code = status.state.terminated.exit_code
                if event["type"] == "DELETED":
                    return
        except (urllib3.exceptions.HTTPError, client.ApiException):
            # The test ended and its namespace went while the pod still ran; a
            # test that needed the exit code fails waiting for it.
            return
