"""Per-worker GPU concurrency limits for Prefect process workers.

The public API lives here, resolved lazily (PEP 562): ``import
prefect_gpu_workers`` and ``import prefect_gpu_workers.naming`` import no
Prefect, so the operator (which needs only the names) installs and runs
without it. A name is imported from its module on first use.

Example:
    >>> from prefect_gpu_workers import gpu_slot, limit_name
    >>> limit_name("pool-abc-123")
    'gpu:pool-abc-123'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the submodule that defines it. Only `slots.client` imports Prefect.
_EXPORTS: dict[str, str] = {
    # the GPU step (Prefect)
    "gpu_slot": "slots.client",
    "agpu_slot": "slots.client",
    "GpuLimitUnavailable": "slots.client",
    "GpuSlotRequest": "slots.client",
    "GpuGrant": "slots.client",
    # names (stdlib only)
    "DEFAULT_LIMIT_PREFIX": "naming",
    "LIMIT_PREFIX_ENV": "naming",
    "WORKER_ID_ENV": "naming",
    "WorkerIdentityError": "naming",
    "limit_name": "naming",
    "memory_limit_name": "naming",
    "limit_prefix_from_env": "naming",
    "parse_limit_name": "naming",
    "validate_limit_prefix": "naming",
    "validate_worker_id": "naming",
    "worker_id_from_env": "naming",
    # capacity (NVML, imported only when detecting)
    "Capacity": "gpu",
    "GpuDevice": "gpu",
    "GpuInventory": "gpu",
    "detect_gpus": "gpu",
    "resolve_capacity": "gpu",
}

# Spelled out (not built from _EXPORTS) so that static tools read it; a unit test
# checks the two agree.
__all__ = [
    "DEFAULT_LIMIT_PREFIX",
    "LIMIT_PREFIX_ENV",
    "WORKER_ID_ENV",
    "Capacity",
    "GpuDevice",
    "GpuGrant",
    "GpuInventory",
    "GpuLimitUnavailable",
    "GpuSlotRequest",
    "WorkerIdentityError",
    "__version__",
    "agpu_slot",
    "detect_gpus",
    "gpu_slot",
    "limit_name",
    "limit_prefix_from_env",
    "memory_limit_name",
    "parse_limit_name",
    "resolve_capacity",
    "validate_limit_prefix",
    "validate_worker_id",
    "worker_id_from_env",
]

if TYPE_CHECKING:  # type checkers and IDEs see the real objects; nothing runs here
    from prefect_gpu_workers.gpu import (
        Capacity,
        GpuDevice,
        GpuInventory,
        detect_gpus,
        resolve_capacity,
    )
    from prefect_gpu_workers.naming import (
        DEFAULT_LIMIT_PREFIX,
        LIMIT_PREFIX_ENV,
        WORKER_ID_ENV,
        WorkerIdentityError,
        limit_name,
        limit_prefix_from_env,
        memory_limit_name,
        parse_limit_name,
        validate_limit_prefix,
        validate_worker_id,
        worker_id_from_env,
    )
    from prefect_gpu_workers.slots.client import (
        GpuGrant,
        GpuLimitUnavailable,
        GpuSlotRequest,
        agpu_slot,
        gpu_slot,
    )


def __getattr__(name: str) -> Any:
    """Import a public name from its submodule on first access (PEP 562)."""
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
