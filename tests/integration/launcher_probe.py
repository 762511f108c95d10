"""A flow that reports how its process was started, for the warm launcher's tests.

It writes ``<report_dir>/<flow run id>.json``: its pid, parent, process group
and session, what its environment and ``/proc`` say of it, its working
directory, a random number, Prefect's logging level as its settings see it,
and (``use_torch``) a sum computed with torch on the CPU. Then, as asked, it
starts a child that sleeps, holds a GPU slot while it sleeps, and ends with
``os._exit(exit_code)``.

Deployed twice by the tests: by module path (``launcher_probe.launcher_probe``,
found through ``PYTHONPATH``, the engine command local mode uses), and from a
git repository that Prefect clones into the run's working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.settings import get_current_settings

from prefect_gpu_workers.naming import FLOW_RUN_ID_ENV, SLOT_BROKER_ENV, WORKER_ID_ENV
from prefect_gpu_workers.procfs import env_value
from prefect_gpu_workers.slots.client import gpu_slot

GREETING = "launcher-probe says hello from pid"


@contextlib.contextmanager
def _maybe_slot(hold: bool) -> Iterator[None]:
    if not hold:
        yield
        return
    with gpu_slot():
        yield


@flow(name="launcher-probe")
def launcher_probe(
    report_dir: str,
    use_torch: bool = False,
    sleep_s: float = 0.0,
    child_sleep_s: float = 0.0,
    hold_slot: bool = False,
    exit_code: int | None = None,
) -> None:
    pid = os.getpid()
    get_run_logger().info("%s %d", GREETING, pid)
    report: dict[str, object] = {
        "pid": pid,
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "run_id": os.environ.get(FLOW_RUN_ID_ENV),
        "proc_run_id": env_value(pid, FLOW_RUN_ID_ENV),
        "worker_id": os.environ.get(WORKER_ID_ENV),
        "slot_broker": os.environ.get(SLOT_BROKER_ENV),
        "cwd": os.getcwd(),
        "random": random.random(),
        "logging_level": get_current_settings().logging.level,
    }
    if use_torch:
        import torch

        report["torch_sum"] = float((torch.ones(3) * 2).sum())
    if child_sleep_s:
        child = subprocess.Popen(["sleep", str(child_sleep_s)])
        report["child_pid"] = child.pid
    with _maybe_slot(hold_slot):
        Path(report_dir, f"{report['run_id']}.json").write_text(json.dumps(report))
        time.sleep(sleep_s)
    if exit_code is not None:
        os._exit(exit_code)
