"""Run the operator: ``python -m pgw_operator [--namespace NS ...] [--liveness URL]``.

One active replica at a time (the chart uses ``strategy: Recreate``); kopf runs
standalone, without peering objects.
"""

from __future__ import annotations

import argparse

import kopf

from pgw_operator import (
    handlers,  # noqa: F401  (registers the handlers)
    metrics,
)
from pgw_operator.api_url import AllowedApiUrls, ApiUrlRejected


def _allowed_api_url(entry: str) -> str:
    try:
        AllowedApiUrls.parse([entry])
    except ApiUrlRejected as exc:
        raise argparse.ArgumentTypeError(f"{entry!r}: {exc.rule}") from exc
    return entry


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
        "--allowed-api-url", action="append", default=[], type=_allowed_api_url, metavar="URL",
        help="the only Prefect API URLs pools may name (repeatable): a URL prefix compared by "
        "scheme, host, port and whole path segments, e.g. http://prefect.prefect.svc:4200/api; "
        "a pool under none gets no request at all. Default: every http(s) URL (no tenant boundary)",
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
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(allowed_api_urls=AllowedApiUrls.parse(args.allowed_api_url)),
    )


if __name__ == "__main__":
    main()
