"""The flow runs a worker has in flight, kept in a file, for the worker that comes next.

A worker that dies without draining (SIGKILL, the OOM killer, a container
restart) takes its flow-run processes with it in a pod, but Prefect still
shows their runs Running: nothing would ever end them. So each worker process
writes the ids of the runs it holds to a file of its own,
``$PREFECT_HOME/pgw-in-flight/<worker>/<owner>.json`` (``owner``: its pid and
start time), whenever they change, and the next worker of the same name
settles the runs it finds in the files of owners that are gone, as a drain
past its deadline would (:func:`prefect_gpu_workers.worker.drain.left_behind_outcome`).

One file per process, not per name: a live worker's file is never read as
left behind (two same-name workers on one ``PREFECT_HOME`` each keep theirs),
and a file whose runs could not be settled (Prefect away) stays until a later
start settles them; a new worker's own writes never overwrite it.

In a pod ``PREFECT_HOME`` is an emptyDir: the files survive a container
restart and go with the pod. Stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect_gpu_workers.procfs import owner_alive, owner_token

JOURNAL_DIR = "pgw-in-flight"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeftBehind:
    """The runs a worker process that is gone recorded in flight."""

    path: Path
    owner: str
    run_ids: tuple[str, ...]


class InFlightJournal:
    """The in-flight run ids of one worker process, on disk.

    Writes are whole and durable: a staging file, fsynced, renamed over the
    journal, and the folder fsynced. A write that fails is logged and
    reported, never raised: the worker's own bookkeeping (Prefect's flow-run
    limiter) must go on whatever the disk does. No run in flight, no file.

    Args:
        home: Prefect's home directory (``PREFECT_HOME``).
        worker_name: the worker's name (its pod's name in a pod).
        owner: this process's owner token (:func:`procfs.owner_token`); tests
            pass another to play an earlier process.
        alive: whether an owner token's process lives (:func:`procfs.owner_alive`;
            the simulation passes its own).

    Example:
        >>> journal = InFlightJournal(tmp_path, "w1")  # doctest: +SKIP
        >>> journal.record(["0b6c..."]); journal.read()  # doctest: +SKIP
        ['0b6c...']
    """

    def __init__(
        self,
        home: Path,
        worker_name: str,
        owner: str | None = None,
        alive: Callable[[str], bool] = owner_alive,
    ) -> None:
        self.folder = home / JOURNAL_DIR / worker_name
        self.owner = owner_token() if owner is None else owner
        self._alive = alive
        self.path = self.folder / f"{self.owner.replace(':', '-')}.json"

    def record(self, run_ids: Iterable[object]) -> bool:
        """Replace what this process's file holds with ``run_ids``; whether that was written.

        A failure (disk full, folder not writable) is logged, not raised.
        """
        ids = sorted(str(run_id) for run_id in run_ids)
        try:
            if not ids:
                self.path.unlink(missing_ok=True)
                return True
            self.folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"owner": self.owner, "runs": ids})
            fd, staging = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.folder)
            try:
                with os.fdopen(fd, "w") as file:
                    file.write(text)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(staging, self.path)
            except BaseException:
                Path(staging).unlink(missing_ok=True)
                raise
            _fsync_dir(self.folder)
        except OSError as exc:
            logger.error("could not record the flow runs in flight in %s: %s", self.path, exc)
            return False
        return True

    def read(self) -> list[str]:
        """The run ids this process last recorded."""
        entry = _read_entry(self.path)
        return list(entry.run_ids) if entry is not None else []

    def left_behind(self) -> list[LeftBehind]:
        """What earlier worker processes of this name recorded and did not live to settle.

        Files of live owners (this process, a twin on the same ``PREFECT_HOME``)
        are not left behind. A file that cannot be read as a journal is logged
        and moved aside (``.corrupt``), so the evidence stays.
        """
        try:
            paths = sorted(self.folder.glob("*.json"))
        except OSError as exc:
            logger.error("could not list the in-flight journals in %s: %s", self.folder, exc)
            return []
        found: list[LeftBehind] = []
        for path in paths:
            entry = _read_entry(path)
            if entry is None or entry.owner == self.owner:
                continue
            if self._alive(entry.owner):
                logger.warning(
                    "worker process %s of this name is alive and holds the runs in %s: "
                    "not settling them",
                    entry.owner,
                    path,
                )
                continue
            found.append(entry)
        return found

    def forget(self, entry: LeftBehind) -> None:
        """Drop a left-behind file once its runs are settled."""
        entry.path.unlink(missing_ok=True)


class RunsInFlight:
    """The flow runs one worker process holds, written to its journal on every change.

    A run is held from its submission until its process has ended; a run the
    drain stopped is kept after that until the drain has set its state
    (:meth:`keep`, :meth:`settled`): a SIGKILL in between leaves it to the next
    worker of this name, never Running with no record.
    """

    def __init__(self, journal: InFlightJournal) -> None:
        self.journal = journal
        self.runs: dict[Any, Any] = {}  # flow run id -> the FlowRun as submitted
        self._kept: set[Any] = set()

    def started(self, runs: Iterable[Any]) -> None:
        """Hold these submitted flow runs (objects with an ``id``)."""
        self.runs.update((run.id, run) for run in runs)
        self._record()

    def ended(self, run_id: Any) -> None:
        """``run_id``'s process has ended (or never started)."""
        if self.runs.pop(run_id, None) is not None:
            self._record()

    def keep(self, run_ids: Iterable[Any]) -> None:
        """Keep ``run_ids`` in the journal until :meth:`settled` (the drain)."""
        self._kept.update(run_ids)
        self._record()

    def settled(self, run_id: Any) -> None:
        """The drain has set this run's state: the next worker need not."""
        self._kept.discard(run_id)
        self._record()

    def _record(self) -> None:
        self.journal.record(set(self.runs) | self._kept)


def _read_entry(path: Path) -> LeftBehind | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.error("could not read the flow runs in flight from %s: %s", path, exc)
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    runs = data.get("runs") if isinstance(data, dict) else None
    owner = data.get("owner") if isinstance(data, dict) else None
    if not isinstance(owner, str) or not isinstance(runs, list):
        aside = path.with_suffix(".corrupt")
        logger.error(
            "the in-flight journal %s is not an owner and a list of run ids; moved to %s, "
            "its runs cannot be settled",
            path,
            aside,
        )
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        return None
    return LeftBehind(path, owner, tuple(str(run_id) for run_id in runs))


def _fsync_dir(folder: Path) -> None:
    # The rename is durable once the folder's entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
