"""Prefect's own per-worker pattern, unchanged: the GPU step holds
``concurrency(f"gpu:{os.environ['WORKER_ID']}")`` and nothing from this project.

The step records its interval inside the block, and holds its slot until the
test creates ``release_file`` (a condition, not a timer), so that the test can
see every slot taken at once before letting go. Deployed with a module
entrypoint (``plain_gpu_flow.plain_gpu_flow``), as ``pgw_flows.deploy`` does;
the workers find the module through ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from prefect import flow, task
from prefect.concurrency.sync import concurrency


@task
def gpu_step(record_dir: str, release_file: str) -> None:
    with concurrency(f"gpu:{os.environ['WORKER_ID']}", occupy=1):
        start = time.time()
        # Prefect counts the slot before this process is inside the block:
        # this marker says the step itself holds it (the test waits for it).
        Path(record_dir, f"{uuid.uuid4().hex}.holding").touch()
        while not Path(release_file).exists():
            time.sleep(0.2)
        end = time.time()
    record = {
        "worker_id": os.environ["WORKER_ID"],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "start": start,
        "end": end,
    }
    Path(record_dir, f"{uuid.uuid4().hex}.json").write_text(json.dumps(record))


@flow
def plain_gpu_flow(record_dir: str, release_file: str) -> None:
    gpu_step(record_dir, release_file)
