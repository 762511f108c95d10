"""Names of the per-worker limit contract, with the standard library only.

A worker's limit is named ``{limit_prefix}:{worker_id}`` (``gpu:<pod name>``).
The operator, the worker entrypoint, local mode and the flows all derive names
here, so that this module can be imported where Prefect is not installed (the
operator's image).

Example:
    >>> limit_name("worker-0")
    'gpu:worker-0'
    >>> parse_limit_name("license:w1")
    ('license', 'w1')
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

WORKER_ID_ENV = "WORKER_ID"
# The limit prefix a worker was set up with (the operator sets it on worker
# pods, local mode on local workers); flows that are not told a prefix use it.
LIMIT_PREFIX_ENV = "PGW_LIMIT_PREFIX"
DEFAULT_LIMIT_PREFIX = "gpu"
# The Unix socket of the worker's slot broker; the worker entrypoint sets it, and
# its flow runs (child processes) inherit it as they inherit WORKER_ID.
SLOT_BROKER_ENV = "PGW_SLOT_BROKER"
# The slot broker's Prefect lease duration in seconds (default 300; Prefect's
# shortest is 60). A knob for drills (bench --faults), not for production.
BROKER_LEASE_ENV = "PGW_BROKER_LEASE_SECONDS"
# Prefect's process worker gives each flow-run process the run's id here.
FLOW_RUN_ID_ENV = "PREFECT__FLOW_RUN_ID"
# When the worker began starting a flow run's process (``time.time()``): its
# first task measures the run's start-up from it.
LAUNCHED_AT_ENV = "PGW_LAUNCHED_AT"

# Pod names are RFC 1123 DNS subdomains; local worker ids follow the same rule
# so that one name works in both worlds.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# The limit prefix is the part before the colon; a DNS label keeps it readable
# and free of the characters Prefect forbids in names (/ % & > <).
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_WORKER_ID = 253
MAX_LIMIT_PREFIX = 63


class WorkerIdentityError(ValueError):
    """The worker identity is missing or cannot name a limit."""


def validate_worker_id(worker_id: str) -> str:
    """Return ``worker_id`` if it can be part of a limit name.

    Args:
        worker_id: a pod name, a host name, ``local-1``...

    Raises:
        WorkerIdentityError: empty, or not a DNS subdomain.
    """
    if not worker_id:
        raise WorkerIdentityError("worker id is empty")
    if len(worker_id) > MAX_WORKER_ID or not _DNS_SUBDOMAIN.match(worker_id):
        raise WorkerIdentityError(
            f"worker id {worker_id!r} is not a DNS subdomain (lowercase letters, digits, "
            f"'-' and '.', at most {MAX_WORKER_ID} characters), as a pod name would be"
        )
    return worker_id


def validate_limit_prefix(limit_prefix: str) -> str:
    """Return ``limit_prefix`` if it can start a limit name.

    Raises:
        ValueError: not a DNS label.
    """
    if len(limit_prefix) > MAX_LIMIT_PREFIX or not _DNS_LABEL.match(limit_prefix):
        raise ValueError(
            f"limit prefix {limit_prefix!r} must be a DNS label "
            f"(lowercase letters, digits and '-', at most {MAX_LIMIT_PREFIX} characters)"
        )
    return limit_prefix


def limit_prefix_from_env(env: Mapping[str, str] | None = None) -> str:
    """The limit prefix from ``PGW_LIMIT_PREFIX``, else ``gpu``.

    Raises:
        ValueError: the variable holds an invalid prefix.
    """
    source = os.environ if env is None else env
    return validate_limit_prefix(source.get(LIMIT_PREFIX_ENV) or DEFAULT_LIMIT_PREFIX)


def worker_id_from_env(env: Mapping[str, str] | None = None) -> str:
    """The worker identity from ``WORKER_ID``.

    Raises:
        WorkerIdentityError: unset or invalid; there is no default, since a
            wrong identity would name a limit nobody created.
    """
    source = os.environ if env is None else env
    value = source.get(WORKER_ID_ENV)
    if value is None:
        raise WorkerIdentityError(
            f"{WORKER_ID_ENV} is not set: start the worker with {WORKER_ID_ENV}=<name> "
            "(on Kubernetes the operator sets it to the pod name)"
        )
    try:
        return validate_worker_id(value)
    except WorkerIdentityError as exc:
        raise WorkerIdentityError(f"{WORKER_ID_ENV}: {exc}") from None


def limit_name(worker_id: str, limit_prefix: str = DEFAULT_LIMIT_PREFIX) -> str:
    """The name of a worker's limit: ``{limit_prefix}:{worker_id}``.

    Raises:
        WorkerIdentityError: invalid worker id.
        ValueError: invalid limit prefix.
    """
    return f"{validate_limit_prefix(limit_prefix)}:{validate_worker_id(worker_id)}"


def parse_limit_name(name: str) -> tuple[str, str] | None:
    """Split ``{limit_prefix}:{worker_id}``; ``None`` if ``name`` does not follow the contract."""
    limit_prefix, sep, worker_id = name.partition(":")
    if not sep:
        return None
    try:
        return validate_limit_prefix(limit_prefix), validate_worker_id(worker_id)
    except ValueError:
        return None
