"""What warm starts cost in memory: each launcher's resident size, each flow run's own pages.

A forked flow run shares the launcher's pages until it writes them, so its
resident size (RSS) counts memory it does not own; its unique set size (USS:
private clean + private dirty pages, ``/proc/<pid>/smaps_rollup``) is what it
adds. The sampler looks at a local session's processes (its marker in their
environment, which forked runs publish too) about once a second: launchers
are the ones started with room in their environment block, flow runs the
ones with a flow-run id. Linux only; elsewhere it finds nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prefect_gpu_workers.naming import FLOW_RUN_ID_ENV
from prefect_gpu_workers.procfs import ENVIRON_ROOM_ENV, PROC, environment, pids_with_env
from prefect_gpu_workers.report import percentile

SAMPLE_S = 1.0


def memory_kib(smaps_rollup: str) -> tuple[int, int]:
    """(RSS, USS) in KiB from the text of ``/proc/<pid>/smaps_rollup``.

    Example:
        >>> memory_kib("Rss:  100 kB\\nPrivate_Clean:  10 kB\\nPrivate_Dirty:  30 kB\\n")
        (100, 40)
    """
    fields: dict[str, int] = {}
    for line in smaps_rollup.splitlines():
        name, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            fields[name.strip()] = int(value[0])
    return fields.get("Rss", 0), fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


@dataclass(frozen=True)
class MemoryFigures:
    """Peaks over a batch, in MiB; None where no such process was seen."""

    launcher_rss_mib: float | None
    run_uss_p50_mib: float | None
    run_uss_max_mib: float | None
    run_rss_p50_mib: float | None
    runs_seen: int


def summarize_memory(
    launcher_rss_kib: Iterable[int], run_peaks_kib: Iterable[tuple[int, int]]
) -> MemoryFigures:
    """Figures from each launcher sample's RSS and each run's peak (RSS, USS).

    Example:
        >>> summarize_memory([204800], [(153600, 20480), (163840, 40960)])
        MemoryFigures(launcher_rss_mib=200.0, run_uss_p50_mib=30.0, run_uss_max_mib=40.0, \
run_rss_p50_mib=155.0, runs_seen=2)
    """
    launchers = list(launcher_rss_kib)
    runs = list(run_peaks_kib)
    uss = [peak_uss / 1024 for _, peak_uss in runs]
    rss = [peak_rss / 1024 for peak_rss, _ in runs]
    return MemoryFigures(
        launcher_rss_mib=max(launchers) / 1024 if launchers else None,
        run_uss_p50_mib=percentile(uss, 50),
        run_uss_max_mib=max(uss) if uss else None,
        run_rss_p50_mib=percentile(rss, 50),
        runs_seen=len(runs),
    )


@dataclass
class ProcessMemorySampler:
    """Samples the launchers and flow-run processes marked ``marker_env=marker`` in a thread."""

    marker_env: str
    marker: str
    interval_s: float = SAMPLE_S
    _launchers: list[int] = field(default_factory=list)
    # flow run id -> its process's peak (RSS, USS) in KiB
    _runs: dict[str, tuple[int, int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ProcessMemorySampler:
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def figures(self) -> MemoryFigures:
        return summarize_memory(self._launchers, self._runs.values())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        for pid in pids_with_env(self.marker_env, self.marker):
            try:
                rss, uss = memory_kib((PROC / str(pid) / "smaps_rollup").read_text())
            except OSError:  # gone, or no smaps_rollup (kernel before 4.14)
                continue
            env = environment(pid)
            if ENVIRON_ROOM_ENV in env:
                self._launchers.append(rss)
                continue
            run_id = env.get(FLOW_RUN_ID_ENV)
            if run_id is None or not _is_python(pid):
                continue
            old_rss, old_uss = self._runs.get(run_id, (0, 0))
            self._runs[run_id] = (max(old_rss, rss), max(old_uss, uss))


def _is_python(pid: int) -> bool:
    """A flow run's own process (not a child it started, e.g. ``sleep``)."""
    try:
        return "python" in Path(PROC / str(pid) / "exe").resolve().name
    except OSError:
        return False
