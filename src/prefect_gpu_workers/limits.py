"""The per-worker limit contract, shared by the flows, the local mode and the operator.

One Prefect global concurrency limit per worker, named ``{limit_prefix}:{worker_id}``,
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

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.concurrency.asyncio import concurrency as async_concurrency
from prefect.concurrency.sync import concurrency as sync_concurrency
from prefect.exceptions import ObjectNotFound

from prefect_gpu_workers.naming import DEFAULT_LIMIT_PREFIX, limit_name, worker_id_from_env


class GpuLimitUnavailable(RuntimeError):
    """The worker's limit cannot gate the GPU step, so the step must not run."""

    def __init__(self, limit_name: str, problem: str, remedy: str) -> None:
        self.limit_name = limit_name
        super().__init__(f"GPU limit {limit_name!r} {problem}; {remedy}")


@dataclass(frozen=True)
class GpuSlotRequest:
    """What one GPU step asks for: ``occupy`` slots of one worker's limit."""

    name: str
    occupy: int = 1

    @classmethod
    def for_worker(
        cls,
        occupy: int = 1,
        limit_prefix: str = DEFAULT_LIMIT_PREFIX,
        worker_id: str | None = None,
    ) -> GpuSlotRequest:
        if occupy < 1:
            raise ValueError(f"occupy must be at least 1, got {occupy}")
        return cls(limit_name(worker_id or worker_id_from_env(), limit_prefix), occupy)

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
    limit_prefix: str = DEFAULT_LIMIT_PREFIX,
    worker_id: str | None = None,
    timeout_seconds: float | None = None,
) -> Iterator[str]:
    """Hold ``occupy`` slots of this worker's GPU limit for the duration of the block.

    Fails closed (:class:`GpuLimitUnavailable`) when the limit is missing,
    inactive or too small. Yields the limit name.
    """
    request = GpuSlotRequest.for_worker(occupy, limit_prefix, worker_id)
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
    limit_prefix: str = DEFAULT_LIMIT_PREFIX,
    worker_id: str | None = None,
    timeout_seconds: float | None = None,
) -> AsyncIterator[str]:
    """Async twin of :func:`gpu_slot`."""
    request = GpuSlotRequest.for_worker(occupy, limit_prefix, worker_id)
    request.check(await aread_limit(request.name))
    async with async_concurrency(
        request.name, occupy=request.occupy, timeout_seconds=timeout_seconds, strict=True
    ):
        yield request.name
