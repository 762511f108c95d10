"""The flow runs a worker has in flight, kept in a file, for the worker that comes next.

A worker that dies without draining (SIGKILL, the OOM killer, a container
restart) takes its flow-run processes with it in a pod, but Prefect still
shows their runs Running: nothing would ever end them. So the worker writes
the ids of the runs it holds to ``$PREFECT_HOME/pgw-in-flight/<worker>.json``
whenever they change, and the next worker of the same name settles the runs
it finds there whose process is gone, as a drain past its deadline would
(:func:`prefect_gpu_workers.drain.run_outcome`).

In a pod ``PREFECT_HOME`` is an emptyDir: the file survives a container
restart and goes with the pod. Stdlib only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

JOURNAL_DIR = "pgw-in-flight"


class InFlightJournal:
    """The in-flight run ids of one worker, on disk.

    Args:
        home: Prefect's home directory (``PREFECT_HOME``).
        worker_name: the worker's name (its pod's name in a pod).

    Example:
        >>> journal = InFlightJournal(tmp_path, "w1")  # doctest: +SKIP
        >>> journal.record(["0b6c..."]); journal.read()  # doctest: +SKIP
        ['0b6c...']
    """

    def __init__(self, home: Path, worker_name: str) -> None:
        self.path = home / JOURNAL_DIR / f"{worker_name}.json"

    def record(self, run_ids: Iterable[object]) -> None:
        """Replace what the file holds with ``run_ids`` (written whole, then renamed)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps(sorted(str(run_id) for run_id in run_ids)))
        os.replace(staging, self.path)

    def read(self) -> list[str]:
        """The run ids last recorded; none when there is no file or it cannot be read."""
        try:
            ids = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return [str(run_id) for run_id in ids] if isinstance(ids, list) else []

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
