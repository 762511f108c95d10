"""The per-worker limit contract, shared by the flows, the local mode and the operator.

One Prefect global concurrency limit per worker, named ``{resource}:{worker_id}``,
sized to that worker's GPU capacity. Only the GPU step acquires it.

Contract:
- the worker identity comes from ``WORKER_ID``; missing or invalid is an error,
  never a silent default (a wrong identity would name a limit nobody created);
- the GPU step fails closed: a missing limit, an inactive one, or an ``occupy``
  larger than the limit raises :class:`GpuLimitUnavailable` before any work runs;
- the slot is released when the block exits, on success, error or cancellation
  (Prefect's own context manager does the release; this module only guards entry).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.concurrency.asyncio import concurrency as async_concurrency
from prefect.concurrency.sync import concurrency as sync_concurrency
from prefect.exceptions import ObjectNotFound

WORKER_ID_ENV = "WORKER_ID"
DEFAULT_RESOURCE = "gpu"
# The limit name prefix a worker was set up with (the operator sets it on worker
# pods, local mode on local workers); flows that are not told a prefix use it.
LIMIT_PREFIX_ENV = "PGW_LIMIT_PREFIX"

# Pod names are RFC 1123 DNS subdomains; local worker ids follow the same rule
# so that one name works in both worlds.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# The resource prefix is the part before the colon; a DNS label keeps it
# readable and free of the characters Prefect forbids in names (/ % & > <).
_RESOURCE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_MAX_WORKER_ID = 253
_MAX_RESOURCE = 63


class WorkerIdentityError(ValueError):
    """The worker identity is missing or cannot name a limit."""


class GpuLimitUnavailable(RuntimeError):
    """The worker's limit cannot gate the GPU step, so the step must not run."""

    def __init__(self, limit_name: str, problem: str, remedy: str) -> None:
        self.limit_name = limit_name
        super().__init__(f"GPU limit {limit_name!r} {problem}; {remedy}")


def validate_worker_id(worker_id: str) -> str:
    """Return ``worker_id`` if it can be part of a limit name, else raise."""
    if not worker_id:
        raise WorkerIdentityError("worker id is empty")
    if len(worker_id) > _MAX_WORKER_ID or not _DNS_SUBDOMAIN.match(worker_id):
        raise WorkerIdentityError(
            f"worker id {worker_id!r} is not a DNS subdomain (lowercase letters, digits, "
            f"'-' and '.', at most {_MAX_WORKER_ID} characters), as a pod name would be"
        )
    return worker_id


def validate_resource(resource: str) -> str:
    """Return ``resource`` if it can prefix a limit name, else raise ``ValueError``."""
    if len(resource) > _MAX_RESOURCE or not _RESOURCE.match(resource):
        raise ValueError(
            f"limit resource prefix {resource!r} must be a DNS label "
            f"(lowercase letters, digits and '-', at most {_MAX_RESOURCE} characters)"
        )
    return resource


def resource_from_env(env: Mapping[str, str] | None = None) -> str:
    """The limit prefix from ``PGW_LIMIT_PREFIX``, else ``gpu``; an invalid one raises."""
    source = os.environ if env is None else env
    return validate_resource(source.get(LIMIT_PREFIX_ENV) or DEFAULT_RESOURCE)


def worker_id_from_env(env: Mapping[str, str] | None = None) -> str:
    """Read the worker identity from ``WORKER_ID``; missing or invalid raises."""
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


def limit_name(worker_id: str, resource: str = DEFAULT_RESOURCE) -> str:
    """The name of a worker's limit: ``{resource}:{worker_id}``."""
    return f"{validate_resource(resource)}:{validate_worker_id(worker_id)}"


def parse_limit_name(name: str) -> tuple[str, str] | None:
    """Split ``{resource}:{worker_id}``; ``None`` if ``name`` does not follow the contract."""
    resource, sep, worker_id = name.partition(":")
    if not sep:
        return None
    try:
        return validate_resource(resource), validate_worker_id(worker_id)
    except ValueError:
        return None


@dataclass(frozen=True)
class GpuSlotRequest:
    """What one GPU step asks for: ``occupy`` slots of one worker's limit."""

    name: str
    occupy: int = 1

    @classmethod
    def for_worker(
        cls,
        occupy: int = 1,
        resource: str = DEFAULT_RESOURCE,
        worker_id: str | None = None,
    ) -> GpuSlotRequest:
        if occupy < 1:
            raise ValueError(f"occupy must be at least 1, got {occupy}")
        return cls(limit_name(worker_id or worker_id_from_env(), resource), occupy)

    def check(self, limit: GlobalConcurrencyLimitResponse | None) -> None:
        """Raise unless ``limit`` (as read from Prefect) can gate this request."""
        if limit is None:
            raise GpuLimitUnavailable(
                self.name,
                "does not exist",
                f"create it with `prefect gcl create {self.name} --limit <slots>` "
                "(the operator and `prefect-gpu-workers demo` create it for you); "
                "the GPU step will not run unlimited",
            )
        if not limit.active:
            raise GpuLimitUnavailable(
                self.name,
                "is inactive",
                f"enable it with `prefect gcl enable {self.name}`; "
                "the GPU step will not run unlimited",
            )
        if self.occupy > limit.limit:
            raise GpuLimitUnavailable(
                self.name,
                f"has {limit.limit} slot(s) but this step needs {self.occupy}",
                f"raise it with `prefect gcl update {self.name} --limit {self.occupy}` "
                "or lower occupy",
            )


def read_limit(name: str) -> GlobalConcurrencyLimitResponse | None:
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None


async def aread_limit(name: str) -> GlobalConcurrencyLimitResponse | None:
    async with get_client() as client:
        try:
            return await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None


@contextmanager
def gpu_slot(
    occupy: int = 1,
    *,
    resource: str = DEFAULT_RESOURCE,
    worker_id: str | None = None,
    timeout_seconds: float | None = None,
) -> Iterator[str]:
    """Hold ``occupy`` slots of this worker's GPU limit for the duration of the block.

    Fails closed (:class:`GpuLimitUnavailable`) when the limit is missing,
    inactive or too small. Yields the limit name.
    """
    request = GpuSlotRequest.for_worker(occupy, resource, worker_id)
    request.check(read_limit(request.name))
    # strict=True covers the limit vanishing between the check and the acquire.
    with sync_concurrency(
        request.name, occupy=request.occupy, timeout_seconds=timeout_seconds, strict=True
    ):
        yield request.name


@asynccontextmanager
async def agpu_slot(
    occupy: int = 1,
    *,
    resource: str = DEFAULT_RESOURCE,
    worker_id: str | None = None,
    timeout_seconds: float | None = None,
) -> AsyncIterator[str]:
    """Async twin of :func:`gpu_slot`."""
    request = GpuSlotRequest.for_worker(occupy, resource, worker_id)
    request.check(await aread_limit(request.name))
    async with async_concurrency(
        request.name, occupy=request.occupy, timeout_seconds=timeout_seconds, strict=True
    ):
        yield request.name
