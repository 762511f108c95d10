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

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

JOURNAL_DIR = "pgw-in-flight"
logger = logging.getLogger(__name__)


class InFlightJournal:
    """The in-flight run ids of one worker, on disk.

    Writes are whole and durable: a staging file of its own (two workers of
    one name on one ``PREFECT_HOME`` never share it), fsynced, renamed over
    the journal under a lock, and the folder fsynced. A write that fails is
    logged and reported, never raised: the worker's own bookkeeping (Prefect's
    flow-run limiter) must go on whatever the disk does.

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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def record(self, run_ids: Iterable[object]) -> bool:
        """Replace what the file holds with ``run_ids``; whether that was written.

        A failure (disk full, folder not writable) is logged, not raised.
        """
        text = json.dumps(sorted(str(run_id) for run_id in run_ids))
        try:
            with self._locked():
                fd, staging = tempfile.mkstemp(
                    prefix=f".{self.path.stem}.", suffix=".tmp", dir=self.path.parent
                )
                try:
                    with os.fdopen(fd, "w") as file:
                        file.write(text)
                        file.flush()
                        os.fsync(file.fileno())
                    os.replace(staging, self.path)
                except BaseException:
                    Path(staging).unlink(missing_ok=True)
                    raise
                _fsync_dir(self.path.parent)
        except OSError as exc:
            logger.error("could not record the flow runs in flight in %s: %s", self.path, exc)
            return False
        return True

    def read(self) -> list[str]:
        """The run ids last recorded; none when there is no file.

        A file that cannot be read as a list of ids is logged and moved aside
        (``.corrupt``), so the evidence stays and the next read starts clean.
        """
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            logger.error("could not read the flow runs in flight from %s: %s", self.path, exc)
            return []
        try:
            ids = json.loads(text)
        except ValueError:
            ids = None
        if not isinstance(ids, list):
            aside = self.path.with_suffix(".corrupt")
            logger.error(
                "the in-flight journal %s is not a list of run ids; moved to %s, "
                "its runs cannot be settled",
                self.path,
                aside,
            )
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return []
        return [str(run_id) for run_id in ids]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable once the folder's entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
