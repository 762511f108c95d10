"""Run the operator: ``python -m pgw_operator [--namespace NS ...] [--liveness URL]``.

One active replica at a time (the chart uses ``strategy: Recreate``); kopf runs
standalone, without peering objects.
"""

from __future__ import annotations

import argparse
import logging

import kopf

from pgw_operator import (
    handlers,  # noqa: F401  (registers the handlers)
    metrics,
)
from pgw_operator.api_url import AllowedApiUrls, ApiUrlRejected
from pgw_operator.pod_rules import DEFAULT_MAX_DRAIN_GRACE_S, DEFAULT_TOLERATION_KEYS, PodPolicy

LOG = logging.getLogger("pgw_operator")


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(allowed_api_urls=allowed, pod_policy=pod_policy_of(args)),
    )


if __name__ == "__main__":
    main()
