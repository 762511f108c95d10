"""Each GPU step's own table artifact: where it ran, how long it waited and held its slot.

The table is one row (:func:`prefect_gpu_workers.records.gpu_step_row`),
published from inside the GPU task, after its slot is given back (an API call
inside the slot would hold the GPU for nothing), so Prefect's UI shows it on
the task run and on its flow run. Its key, ``gpu-step-<flow run id>``, finds
it from a run's id and all of them by the prefix ``gpu-step-``; two runs never
share one (a step tried again adds a version to its run's key).

On by default; off with the flow parameter ``artifacts=False`` (``demo
--no-artifacts`` passes it) or ``PGW_ARTIFACTS=0`` on the worker. Publishing
never fails the step: an error is logged as a warning once per process and
the step goes on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from prefect_gpu_workers.records import StageRecord, gpu_step_row

ARTIFACTS_ENV = "PGW_ARTIFACTS"
_OFF = frozenset({"0", "false", "no", "off"})
KEY_PREFIX = "gpu-step-"

# Once per process: a flow-run process whose artifacts fail says so once, not per step.
_warned = False


def artifacts_enabled(parameter: bool | None, environ: Mapping[str, str]) -> bool:
    """The flow parameter where given, else ``PGW_ARTIFACTS`` (``0``/``false``/``no``/``off``
    turn it off), else on.

    Example:
        >>> artifacts_enabled(None, {}), artifacts_enabled(None, {"PGW_ARTIFACTS": "0"})
        (True, False)
        >>> artifacts_enabled(True, {"PGW_ARTIFACTS": "off"})
        True
    """
    if parameter is not None:
        return parameter
    return environ.get(ARTIFACTS_ENV, "").strip().lower() not in _OFF


def gpu_step_key(run_id: str) -> str:
    """A valid Prefect artifact key (lowercase letters, digits, dashes) for a run's GPU step.

    Example:
        >>> gpu_step_key("0B6F0E3C-1A2B-4C5D-8E9F-A0B1C2D3E4F5")
        'gpu-step-0b6f0e3c-1a2b-4c5d-8e9f-a0b1c2d3e4f5'
    """
    return KEY_PREFIX + (re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-") or "none")


def describe_step(record: StageRecord) -> str:
    """The artifact's one-line description."""
    waited, held = record.start - record.requested, record.end - record.start
    outcome = "failed" if record.error else "done"
    return (
        f"GPU step of {record.worker_id} ({outcome}): waited {waited:.2f} s for "
        f"{record.limit or 'no limit'}, held {held:.2f} s"
    )


def publish_gpu_step(
    record: StageRecord,
    gpu_uuid: str | None,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    """Publish the step's table artifact in the current task run; never raises."""
    global _warned
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            [gpu_step_row(record, gpu_uuid)],
            key=gpu_step_key(record.run_id),
            description=describe_step(record),
        )
    except Exception as exc:  # an artifact is a courtesy: the step's work is done
        if not _warned:
            _warned = True
            logger.warning(
                "could not publish the GPU step's artifact (%s: %s); the run goes on, and "
                "this is said once per process (%s=0 turns artifacts off)",
                type(exc).__name__,
                exc,
                ARTIFACTS_ENV,
            )
