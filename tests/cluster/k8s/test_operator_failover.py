"""A leader and a hot standby against the real control plane: SIGKILL the leader,
the standby takes the Lease and serves the pools.

Two operator processes (``--leader-elect``, a 4 s lease, 3 s renew deadline,
1 s retry period) contend for a Lease in the test's namespace, as the chart's
two replicas do in theirs. Exactly one holds it; the standby's watches are
warm, so once the leader is killed (no release: a lost node) the standby
takes the Lease within the lease duration plus a retry period, and pools
created or scaled after the kill get their limits.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_gpu_workers.server import LocalPrefectServer, free_port

from .cluster import DevCluster
from .operator_harness import (
    OperatorProcess,
    Pools,
    PrefectLimits,
    leader_election_args,
    lease_holder,
    pool_spec,
    ready_with_limits,
    start_pool,
    wait_until,
)

LEASE = "pgw-operator-failover"
LEASE_DURATION_S, RENEW_DEADLINE_S, RETRY_PERIOD_S = 4.0, 3.0, 1.0


@pytest.fixture
def operators(
    dev_cluster: DevCluster, namespace: str, node_group: str, tmp_path: Path
) -> Iterator[dict[str, OperatorProcess]]:
    """Two operators for ``namespace``, by identity; their log tails are printed after."""
    timing = (LEASE_DURATION_S, RENEW_DEADLINE_S, RETRY_PERIOD_S)
    procs = {
        identity: OperatorProcess(
            dev_cluster.kubeconfig,
            namespace,
            tmp_path / f"{identity}.log",
            metrics_port=free_port(),
            extra_args=(
                *OperatorProcess.extra_args,
                *leader_election_args(namespace, identity, LEASE, timing),
            ),
        )
        for identity in ("operator-a", "operator-b")
    }
    for proc in procs.values():
        proc.start()
    try:
        yield procs
    finally:
        for identity, proc in procs.items():
            proc.stop()
            print(f"--- {identity} log ---\n{proc.log_tail(60)}")


def leader_gauge(proc: OperatorProcess) -> float | None:
    """pgw_operator_leader as the process serves it; None while it does not answer yet."""
    try:
        return proc.metrics().get("pgw_operator_leader")
    except Exception:
        return None


def test_the_standby_takes_over_a_killed_leader_and_serves_new_and_scaled_pools(
    dev_cluster: DevCluster,
    namespace: str,
    node_group: str,
    operators: dict[str, OperatorProcess],
    pools: Pools,
    limits: PrefectLimits,
    prefect_server: LocalPrefectServer,
) -> None:
    url = prefect_server.api_url
    leader_id = wait_until(
        lambda: lease_holder(dev_cluster, namespace, LEASE), "one operator to take the Lease"
    )
    assert leader_id in operators
    (standby_id,) = set(operators) - {leader_id}
    leader, standby = operators[leader_id], operators[standby_id]

    # Exactly one leads: the Lease names it, and each process says which it is.
    gauges = wait_until(
        lambda: (
            (g := {i: leader_gauge(p) for i, p in operators.items()})
            and None not in g.values()
            and g
        ),
        "both operators serving metrics",
    )
    assert gauges == {leader_id: 1.0, standby_id: 0.0}
    wait_until(
        lambda: f"standby: lease {namespace}/{LEASE} is held by {leader_id}" in standby.log(),
        "the standby to say whom it waits for",
    )

    # The leader serves a pool; the standby keeps waiting.
    spec = pool_spec(url, node_group, "gpu8", {"perWorker": 1}, 1)
    before = start_pool(pools, limits, "before", spec)
    assert len(before) == 1
    assert lease_holder(dev_cluster, namespace, LEASE) == leader_id
    assert leader_gauge(standby) == 0.0

    # A lost node: no SIGTERM, no release. The standby takes over once the lease
    # it last saw renewed expires (lease duration), at its next try.
    leader.kill()
    killed_at = time.monotonic()
    wait_until(
        lambda: lease_holder(dev_cluster, namespace, LEASE) == standby_id,
        f"{standby_id} to take the Lease",
        timeout=LEASE_DURATION_S + 10,
        interval=0.1,
    )
    took_s = time.monotonic() - killed_at
    assert took_s <= LEASE_DURATION_S + 2.0, f"failover took {took_s:.1f} s"
    standby.assert_alive()
    assert leader_gauge(standby) == 1.0
    log = standby.log()
    assert f"took it over from {leader_id}, whose lease expired" in log
    # While it waited, it wrote nothing to Prefect (httpx logs each request).
    waiting = log[: log.index(f"took it over from {leader_id}")]
    writes = re.findall(r"HTTP Request: (?:POST|PATCH|PUT|DELETE) \S+", waiting)
    assert not [w for w in writes if "/flow_runs/count" not in w], writes  # counts are reads

    # The new leader serves what changes after the kill: a new pool and a scale-up.
    after = start_pool(pools, limits, "after", spec)
    assert len(after) == 1
    pools.scale("before", 2)
    scaled = wait_until(
        lambda: ready_with_limits(pools, limits, "before", 2), "pool before scaled to 2 limits"
    )
    assert set(before) < set(scaled)

    # And it deletes them: the finalizer needs the leader (the killed one is gone).
    for name in ("before", "after"):
        pools.delete(name)
    wait_until(
        lambda: not pools.exists("before") and not pools.exists("after"),
        "both pools gone (finalizers released by the new leader)",
    )
    gone = set(scaled) | set(after)
    wait_until(
        lambda: all(limits.get(f"gpu:{pod}") is None for pod in gone),
        "every limit of both pools deleted",
    )
    standby.assert_alive()
