"""Names of the per-worker limit contract, with the standard library only.

A worker's limit is named ``{limit_prefix}:{worker_id}`` (``gpu:<pod name>``).
The operator, the worker entrypoint, local mode and the flows all derive names
here, so that this module can be imported where Prefect is not installed (the
operator's image).

A worker whose GPU steps ask for memory has a second limit,
``{limit_prefix}-memory:{worker_id}``, counted in whole GiB: its size is the
worker's GPU memory rounded down, a step occupies its request rounded up.

Example:
    >>> limit_name("worker-0")
    'gpu:worker-0'
    >>> memory_limit_name("worker-0")
    'gpu-memory:worker-0'
    >>> parse_limit_name("license:w1")
    ('license', 'w1')
"""

from __future__ import annotations

import math
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


# The memory limit's prefix is the slot limit's with this after it.
MEMORY_LIMIT_SUFFIX = "-memory"
MIB_PER_GIB = 1024
# Units a memory size may carry: binary (GiB, Gi: Kubernetes' spelling) and
# decimal (GB, G). No unit: GiB.
_MEMORY_UNITS_MIB = {
    "": 1024.0,
    "gib": 1024.0, "gi": 1024.0, "mib": 1.0, "mi": 1.0, "tib": 1024.0**2, "ti": 1024.0**2,
    "gb": 1e9 / 2**20, "g": 1e9 / 2**20, "mb": 1e6 / 2**20, "m": 1e6 / 2**20,
    "tb": 1e12 / 2**20, "t": 1e12 / 2**20,
}  # fmt: skip
_MEMORY_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def memory_limit_name(worker_id: str, limit_prefix: str = DEFAULT_LIMIT_PREFIX) -> str:
    """The name of a worker's GPU memory limit: ``{limit_prefix}-memory:{worker_id}``.

    Raises:
        WorkerIdentityError: invalid worker id.
        ValueError: the prefix with ``-memory`` after it is not a DNS label.
    """
    return limit_name(worker_id, limit_prefix + MEMORY_LIMIT_SUFFIX)


def parse_memory_mib(text: str | int | float) -> int:
    """A memory size (``"20GiB"``, ``"20Gi"``, ``"80GB"``, ``"512MiB"``; a bare
    number is GiB) in MiB, rounded down.

    Raises:
        ValueError: not a positive size with a known unit.

    Example:
        >>> parse_memory_mib("20GiB"), parse_memory_mib("1.5Gi"), parse_memory_mib(8)
        (20480, 1536, 8192)
        >>> parse_memory_mib("80GB")
        76293
    """
    match = _MEMORY_SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _MEMORY_UNITS_MIB:
        raise ValueError(
            f"memory size {text!r} is not a number with a unit (GiB, Gi, MiB, GB; "
            "a bare number is GiB)"
        )
    mib = int(float(match.group(1)) * _MEMORY_UNITS_MIB[unit])
    if mib < 1:
        raise ValueError(f"memory size {text!r} is below 1 MiB")
    return mib


def gib_held(mib: int) -> int:
    """What a step asking for ``mib`` occupies of a memory limit: whole GiB, rounded up.

    Example:
        >>> gib_held(20480), gib_held(20481)
        (20, 21)
    """
    return max(1, math.ceil(mib / MIB_PER_GIB))


def gib_capacity(mib: int) -> int:
    """What a GPU of ``mib`` adds to a memory limit: whole GiB, rounded down, so that
    steps placed within it never ask the limit for more than it has.

    Example:
        >>> gib_capacity(81920), gib_capacity(40960 - 1)
        (80, 39)
    """
    return mib // MIB_PER_GIB
