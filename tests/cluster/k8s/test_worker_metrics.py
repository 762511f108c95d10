"""A real worker pod's ``/metrics``, scraped over HTTP from this machine after a run.

The pool sets ``spec.worker.metricsPort``: the operator gives the worker
``--metrics-port`` and a container port named ``metrics``; the worker (its
slot broker's accounting) serves its Prometheus text there. The pod runs on
the dev cluster's real node, on the node's bridge (``10.244.0.0/24``, this
machine at its gateway address), so the test reaches it at the pod's IP, the
address a Prometheus in the cluster scrapes (a PodMonitor on the ``metrics``
port). No port-forward, no Service: nothing between the test and the pod.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prometheus_client.parser import text_string_to_metric_families

from pgw_flows.deploy import deploy_pipeline
from pgw_flows.pipeline import FLOW_NAME
from prefect_gpu_workers.local.prefect_ops import submit_runs
from prefect_gpu_workers.slots.metrics import EXPORTED

from .node_workers import NodeWorkers, run_params, wait_until_final, worker_status
from .operator_harness import OperatorProcess, Pools, unique, wait_until

METRICS_PORT = 9400
GPU_S = 3.0  # the simulated GPU step holds its slot at least this long
GPU_TASK = "inference"  # the pipeline's GPU step (pgw_flows.pipeline.inference)

Labels = frozenset[tuple[str, str]]


def pod_ip(pools: Pools, pod: str) -> str | None:
    status = pools.core.read_namespaced_pod(pod, pools.namespace).status
    return status.pod_ip if status else None


def scrape(ip: str) -> str:
    """GET /metrics at the pod's IP, straight over the node's bridge.

    ``trust_env=False``: a proxy from the environment must not carry a request
    to a pod address.
    """
    with httpx.Client(trust_env=False, timeout=5) as http:
        response = http.get(f"http://{ip}:{METRICS_PORT}/metrics")
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return response.text


def samples_of(text: str) -> dict[str, dict[Labels, float]]:
    """Sample name -> labels -> value, as Prometheus's own parser reads the text."""
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def declared_types(text: str) -> dict[str, str]:
    """Family -> type from the ``# TYPE`` lines, as the worker wrote them."""
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind
    return types


def matching(series: Mapping[Labels, float], **wanted: str) -> dict[Labels, float]:
    return {labels: value for labels, value in series.items() if set(wanted.items()) <= labels}


def test_a_worker_pods_metrics_show_its_deployments_gpu_time_after_a_run(
    node_workers: NodeWorkers, operator: OperatorProcess, prefect: SyncPrefectClient
) -> None:
    began = time.monotonic()
    pools = node_workers.pools
    work_pool, pods = node_workers.start("metrics", 1, flow_runs=2, metrics_port=METRICS_PORT)
    (pod,) = pods
    limit = f"gpu:{pod}"
    # The operator put the port on the pod as the contract says ...
    container = pools.worker_container("metrics")
    assert container["command"][-2:] == ["--metrics-port", str(METRICS_PORT)]
    assert {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in container[
        "ports"
    ]
    # ... and reports the pool healthy: pgw_pool_degraded 0.
    pool_series = f'pgw_pool_degraded{{namespace="{pools.namespace}",pool="metrics"}}'
    wait_until(lambda: operator.metrics().get(pool_series) == 0.0, "pgw_pool_degraded 0")

    wait_until(lambda: (s := worker_status(pools, pod)) and s.ready, "the worker Ready", 180)
    ip = wait_until(lambda: pod_ip(pools, pod), "the pod's IP")
    before = samples_of(scrape(ip))
    assert before["pgw_gpu_slots"] == {frozenset({("limit", limit)}): 2.0}
    assert not matching(before.get("pgw_gpu_steps_total", {}), limit=limit)

    deployment = unique("metrics")
    params = run_params(records=False, gpu_s=GPU_S)
    deployment_id = deploy_pipeline(work_pool, name=deployment, parameters=params)
    (run,) = wait_until_final(prefect, submit_runs(prefect, deployment_id, 1, params))
    assert run.state is not None
    assert run.state.type.value == "COMPLETED", run.state
    ran_s = time.monotonic() - began

    text = scrape(ip)
    samples = samples_of(text)
    who = {"limit": limit, "deployment": deployment}
    held = matching(samples["pgw_gpu_step_held_slot_seconds_total"], **who)
    steps = matching(samples["pgw_gpu_steps_total"], **who)
    waited = matching(samples["pgw_gpu_step_waited_seconds_total"], **who)
    print(f"{pod} at {ip}:{METRICS_PORT} after one run of {deployment}: held {held}, "
          f"steps {steps}, waited {waited}")  # fmt: skip
    # One series: the run's flow and its GPU task.
    step_labels = frozenset({**who, "flow": FLOW_NAME, "task": GPU_TASK}.items())
    assert set(steps) == {step_labels}, steps
    assert steps[step_labels] == 1
    # The step slept GPU_S inside its slot (one slot), between the broker's grant
    # and its release: the broker counted that (the step's sleep is by the wall
    # clock; a 10% margin keeps a clock adjustment meanwhile from failing it).
    assert held[step_labels] >= 0.9 * GPU_S
    assert waited[step_labels] >= 0
    # Every family the pod exports is in the worker's contract, with its type.
    types = declared_types(text)
    assert {name: EXPORTED.get(name) for name in types} == types
    # The slot is given back: the broker's own gauge reaches 0 (it releases as the
    # step's connection closes, which may trail the run's final state a moment).
    wait_until(
        lambda: samples_of(scrape(ip))["pgw_gpu_slots_held"] == {frozenset({("limit", limit)}): 0},
        "the slot given back",
    )
    print(f"pool up, one run and the scrapes: {time.monotonic() - began:.1f} s "
          f"(run ended at {ran_s:.1f} s)")  # fmt: skip
