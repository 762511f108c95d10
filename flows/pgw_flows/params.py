"""The pipeline's parameters, defined once, with the standard library only.

``gpu_pipeline`` takes its signature's defaults from :class:`PipelineParams`,
and whoever submits runs (local mode, tests, a user's script) builds them
here, so that a parameter is named and defaulted in one place. A test checks
that the flow's signature and these fields agree.

Example:
    >>> PipelineParams(items=2, simulate=True).as_parameters()["items"]
    2
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PipelineParams:
    """Parameters of one ``gpu_pipeline`` run.

    Download and save durations are minimums: the stage does its work, then
    sleeps out the rest. The GPU step on CUDA runs ``gpu_batches`` batches and
    never sleeps; elsewhere ``gpu_s`` is a minimum too.
    """

    # Inputs per run (synthetic token sequences).
    items: int = 4
    # GPU slots the GPU step holds at once.
    occupy: int = 1
    # None: the flow takes the prefix from its worker's PGW_LIMIT_PREFIX, else "gpu".
    limit_prefix: str | None = None
    download_s: float = 0.0
    gpu_s: float = 0.0
    save_s: float = 0.0
    # Sleep instead of running the model (no torch import).
    simulate: bool = False
    # Where each stage appends its record; None: PGW_RECORD_DIR, else nowhere.
    record_dir: str | None = None
    # Raise inside the GPU slot (fault injection for tests and drills).
    fail_in_gpu_step: bool = False
    # The GPU step's work in encoder batches; None: calibrated for gpu_s once
    # per machine (pgw_flows.model). On CUDA the step is timed by this work.
    gpu_batches: int | None = None
    # Share of the GPU's memory each step sets aside for its working set (0: none).
    gpu_memory_fraction: float = 0.0
    # Run the GPU step without taking a slot: only to show what the limit prevents.
    unlimited: bool = False
    # GPU memory the GPU step declares ("20GiB"): its worker's broker places it on
    # a GPU with that much free. None: a slot alone, as before.
    gpu_memory: str | None = None
    # Other global limits the GPU step holds with its slot ({"licence:x": 1}).
    gpu_also: dict[str, int] | None = None
    # Publish the GPU step's table artifact; None: PGW_ARTIFACTS on the worker
    # decides ("0" turns it off), else on.
    artifacts: bool | None = None

    def as_parameters(self) -> dict[str, Any]:
        """Flow-run parameters; ``None`` values are left out so the flow's fallbacks apply."""
        return {name: value for name, value in asdict(self).items() if value is not None}
