"""Run the operator: ``python -m pgw_operator [--namespace NS ...] [--leader-elect ...]``.

One active replica at a time. With ``--leader-elect`` (the chart's default,
two replicas) the replicas contend for a ``coordination.k8s.io`` Lease
(:mod:`pgw_operator.leader`): every replica runs kopf, so its watches and
indexes stay warm, but only the one holding the Lease writes (handlers wait
for ``memo["leadership"].wait_leading()``); a standby takes over when the
leader stops renewing (lease duration) or releases the Lease on SIGTERM (its
next retry period). Without it this process is the only one and always leads
(run one replica: ``strategy: Recreate``). kopf runs standalone either way:
its own peering would pause the standby's watches, not just its writes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

import kopf

from pgw_operator import (
    handlers,  # noqa: F401  (registers the handlers)
    kube,
    metrics,
)
from pgw_operator.api_url import AllowedApiUrls, ApiUrlRejected
from pgw_operator.leader import Leadership, LeaseSettings, run_election
from pgw_operator.pod_rules import DEFAULT_MAX_DRAIN_GRACE_S, DEFAULT_TOLERATION_KEYS, PodPolicy

LOG = logging.getLogger("pgw_operator")

DEFAULT_LEASE_NAME = "prefect-gpu-workers-operator"
# Where a pod's ServiceAccount token puts its namespace (the Lease's default).
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _allowed_api_url(entry: str) -> str:
    try:
        AllowedApiUrls.parse([entry])
    except ApiUrlRejected as exc:
        raise argparse.ArgumentTypeError(f"{entry!r}: {exc.rule}") from exc
    return entry


def pod_policy_of(args: argparse.Namespace) -> PodPolicy:
    return PodPolicy(
        service_accounts=frozenset(args.allowed_service_account),
        toleration_keys=frozenset(args.allowed_toleration_key or DEFAULT_TOLERATION_KEYS),
        priority_classes=frozenset(args.allowed_priority_class),
        max_drain_grace_s=args.max_drain_grace_seconds,
    )


def leader_settings_of(args: argparse.Namespace) -> LeaseSettings | None:
    """The Lease to contend for, or None without ``--leader-elect``.

    Defaults: the namespace from ``POD_NAMESPACE`` (the chart sets it from the
    downward API), else the pod's ServiceAccount namespace file; the identity
    from ``POD_NAME``, else this host's name and process id.

    Raises:
        ValueError: no namespace can be found, or the timing is out of order.
    """
    if not args.leader_elect:
        return None
    namespace = args.leader_elect_namespace or os.environ.get("POD_NAMESPACE", "")
    if not namespace:
        try:
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        except OSError:
            namespace = ""
    if not namespace:
        raise ValueError(
            "--leader-elect needs the Lease's namespace: give --leader-elect-namespace, "
            f"or set POD_NAMESPACE (none, and no {SERVICE_ACCOUNT_NAMESPACE})"
        )
    identity = (
        args.leader_elect_identity
        or os.environ.get("POD_NAME", "")
        or f"{socket.gethostname()}-{os.getpid()}"
    )
    return LeaseSettings(
        name=args.leader_elect_lease_name,
        namespace=namespace,
        identity=identity,
        lease_duration_s=args.leader_elect_lease_duration,
        renew_deadline_s=args.leader_elect_renew_deadline,
        retry_period_s=args.leader_elect_retry_period,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pgw_operator", description=__doc__)
    parser.add_argument(
        "--namespace", "-n", action="append", default=[],
        help="watch only this namespace (repeatable); default: all namespaces",
    )  # fmt: skip
    parser.add_argument(
        "--liveness", default="http://127.0.0.1:8080/healthz",
        help="liveness endpoint URL (bind 0.0.0.0 inside a pod for the kubelet's probe)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics", default="",
        help="serve Prometheus metrics on HOST:PORT (e.g. 0.0.0.0:9090); off when empty",
    )  # fmt: skip
    parser.add_argument(
        "--log-format", choices=("json", "full", "plain"), default="full",
        help="json: one object per line with the pool's namespace/name (for log pipelines)",
    )  # fmt: skip
    parser.add_argument(
        "--allowed-api-url", action="append", default=[], type=_allowed_api_url,
        metavar="[NAMESPACE=]URL",
        help="the only Prefect API URLs pools may name (repeatable): a URL prefix compared by "
        "scheme, host, port and whole path segments, for pools of NAMESPACE (none or *: every "
        "namespace), e.g. team-a=https://prefect.team-a.svc/api; a pool under none gets no "
        "request at all. Default: none, so no pool is served without --allow-any-api-url",
    )  # fmt: skip
    parser.add_argument(
        "--allow-any-api-url", action="store_true",
        help="allow every http(s) URL to every namespace: no tenant boundary (trusted tenants)",
    )  # fmt: skip
    parser.add_argument(
        "--allowed-service-account", action="append", default=[], metavar="NAME",
        help="a serviceAccountName pools' pods may name (repeatable); default: none, so "
        "worker pods run as their pool's own account ({pool}-worker: no rights, no token)",
    )  # fmt: skip
    parser.add_argument(
        "--allowed-toleration-key", action="append", default=[], metavar="KEY",
        help="a taint key pools' pods may tolerate (repeatable); default: "
        f"{', '.join(DEFAULT_TOLERATION_KEYS)}. A toleration without a key is never allowed",
    )  # fmt: skip
    parser.add_argument(
        "--allowed-priority-class", action="append", default=[], metavar="NAME",
        help="a priorityClassName pools' pods may name (repeatable); default: none",
    )  # fmt: skip
    parser.add_argument(
        "--max-drain-grace-seconds", type=int, default=DEFAULT_MAX_DRAIN_GRACE_S, metavar="S",
        help="the longest spec.worker.drainGracePeriodSeconds a pool may ask "
        f"(default {DEFAULT_MAX_DRAIN_GRACE_S}): a worker's grace holds node drains",
    )  # fmt: skip
    election = parser.add_argument_group(
        "leader election",
        "Run several replicas, one acting: they contend for a coordination.k8s.io/v1 Lease. "
        "Needs get, update on that Lease and create on leases in its namespace.",
    )
    election.add_argument(
        "--leader-elect", action="store_true",
        help="act only while holding the Lease (others wait as warm standbys); default off: "
        "this process always acts, so run one replica only",
    )  # fmt: skip
    election.add_argument(
        "--leader-elect-lease-name", default=DEFAULT_LEASE_NAME, metavar="NAME",
        help=f"the Lease's name (default {DEFAULT_LEASE_NAME})",
    )  # fmt: skip
    election.add_argument(
        "--leader-elect-namespace", default="", metavar="NS",
        help="the Lease's namespace (default: $POD_NAMESPACE, else the pod's ServiceAccount "
        "namespace)",
    )  # fmt: skip
    election.add_argument(
        "--leader-elect-identity", default="", metavar="ID",
        help="this replica's holderIdentity, unique among replicas (default: $POD_NAME, else "
        "HOSTNAME-PID)",
    )  # fmt: skip
    election.add_argument(
        "--leader-elect-lease-duration", type=float, default=15.0, metavar="S",
        help="seconds a standby waits after the last renewal it saw before taking over "
        "(default 15)",
    )  # fmt: skip
    election.add_argument(
        "--leader-elect-renew-deadline", type=float, default=10.0, metavar="S",
        help="seconds the leader keeps trying to renew before it stops acting and exits "
        "(default 10; less than the lease duration)",
    )  # fmt: skip
    election.add_argument(
        "--leader-elect-retry-period", type=float, default=2.0, metavar="S",
        help="seconds between tries to renew or acquire (default 2; less than the renew "
        "deadline)",
    )  # fmt: skip
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


async def run_operator(
    kopf_args: dict[str, Any], lease: LeaseSettings | None, leadership: Leadership
) -> None:
    """kopf and, with a Lease, the election, in one event loop.

    The election task starts before kopf, so kopf counts it as not its own
    and leaves it alone when it stops. On SIGTERM kopf stops its handlers
    first; only then is the election cancelled, which releases the Lease: the
    next leader cannot start while this one's pool loops still write.
    """
    if lease is None:
        await kopf.operator(**kopf_args)
        return
    kube.load_config()  # kopf's startup handler does it again; election starts sooner
    election = asyncio.create_task(run_election(lease, leadership), name="leader election")
    try:
        await kopf.operator(**kopf_args)
    finally:
        election.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await election


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        lease = leader_settings_of(args)
    except ValueError as exc:
        parser.error(str(exc))
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat[args.log_format.upper()],
        log_refkey="object",
    )
    if args.metrics:
        metrics.serve(args.metrics)
    allowed = AllowedApiUrls.parse(args.allowed_api_url, allow_any=args.allow_any_api_url)
    if allowed.allow_any:
        LOG.warning("--allow-any-api-url: pools may send this operator to any URL")
    elif not allowed.entries:
        LOG.warning("no --allowed-api-url: every pool stays Degraded (ApiUrlNotAllowed)")
    leadership = Leadership.always() if lease is None else Leadership(lease.identity)
    kopf_args: dict[str, Any] = {
        "standalone": True,
        "clusterwide": not args.namespace,
        "namespaces": args.namespace,
        "liveness_endpoint": args.liveness or None,
        "memo": kopf.Memo(
            allowed_api_urls=allowed, pod_policy=pod_policy_of(args), leadership=leadership
        ),
    }
    # As kopf.run does: a signal stops kopf (its handlers), which then returns.
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(run_operator(kopf_args, lease, leadership))


if __name__ == "__main__":
    main()
