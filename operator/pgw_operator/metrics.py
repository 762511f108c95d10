"""Prometheus metrics of the operator, per pool.

Served by ``prometheus_client`` on the address given with ``--metrics``;
nothing listens when it is not given.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

POOL = ("namespace", "pool")

SLOTS_TOTAL = Gauge("pgw_pool_gpu_slots", "GPU slots across the pool's worker limits", POOL)
SLOTS_IN_USE = Gauge(
    "pgw_pool_gpu_slots_in_use", "Slots held at the last reconcile (Prefect active_slots)", POOL
)
WORKERS_READY = Gauge("pgw_pool_workers_ready", "Worker pods ready with their limit", POOL)
WORKERS_DESIRED = Gauge("pgw_pool_workers_desired", "spec.replicas of the pool", POOL)
RECONCILE_SECONDS = Histogram(
    "pgw_reconcile_duration_seconds",
    "Duration of one reconcile pass",
    POOL,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "pgw_reconcile_errors_total", "Failed reconcile passes by reason", (*POOL, "reason")
)
LIMIT_ACTIONS = Counter(
    "pgw_limit_actions_total", "Limit changes made in Prefect", (*POOL, "action")
)
DEGRADED = Gauge(
    "pgw_pool_degraded",
    "1 while the pool's Degraded condition is True (a failed pass, limit sizing, "
    "worker pods rejected), else 0",
    POOL,
)

BACKLOG_RUNS = Gauge(
    "pgw_pool_backlog_runs",
    "Flow runs of the pool's work pool that need a worker, by state "
    "(scheduled: due now, Late included; pending; running). Sum them to scale with KEDA or an HPA.",
    (*POOL, "state"),
)

# One series per process, no labels: which replica leads is the pod label the
# scrape adds; the identity as a label would make a new series per pod.
LEADER = Gauge(
    "pgw_operator_leader",
    "1 while this operator process leads (holds the leader-election Lease, or runs "
    "without --leader-elect), else 0 (standby)",
)


# What the operator costs the servers it talks to, per process (the benchmark
# divides them by pods): bounded labels, never an object's name.
KUBERNETES_REQUESTS = Counter(
    "pgw_operator_kubernetes_requests_total",
    "Requests to the Kubernetes API made by the reconciler (kopf's watches not counted)",
    ("verb",),
)
PREFECT_REQUESTS = Counter(
    "pgw_operator_prefect_requests_total", "Requests to Prefect APIs", ("method",)
)


def serve(address: str) -> None:
    """Serve /metrics on ``host:port``."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1")


ALL = (SLOTS_TOTAL, SLOTS_IN_USE, WORKERS_READY, WORKERS_DESIRED, RECONCILE_SECONDS,
       RECONCILE_ERRORS, LIMIT_ACTIONS, BACKLOG_RUNS, DEGRADED)  # fmt: skip


def forget_pool(namespace: str, pool: str) -> None:
    """Drop every series of a deleted pool so dashboards do not show ghosts."""
    for metric in ALL:
        metric.remove_by_labels({"namespace": namespace, "pool": pool})
