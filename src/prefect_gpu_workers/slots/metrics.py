"""Prometheus metrics of a worker's slot broker, served on a Unix socket when asked.

Nothing listens on TCP: ``prefect-gpu-workers worker --metrics-socket PATH`` serves
the text exposition format on ``PATH`` (mode 0600), readable with
``curl --unix-socket PATH http://localhost/metrics`` or a sidecar that relays it.

Metrics (label ``limit``, the limit's name):
- ``pgw_gpu_slots`` capacity, ``pgw_gpu_slots_held``, ``pgw_gpu_slot_waiters``;
- ``pgw_gpu_slot_grants_total``, ``pgw_gpu_slot_reclaimed_total`` (holders that
  died or left holding), ``pgw_gpu_slot_lost_leases_repaired_total``;
- histograms ``pgw_gpu_slot_wait_seconds`` (asked -> Prefect lease taken) and
  ``pgw_gpu_slot_handoff_seconds`` (a holder let go while others waited -> the
  next lease taken).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0
)  # fmt: skip


@dataclass
class Histogram:
    """A cumulative Prometheus-style histogram (bounded memory, unlike a list of samples)."""

    bounds: tuple[float, ...] = BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [
            f'{name}_bucket{{{labels},le="{bound:g}"}} {count}'
            for bound, count in zip(self.bounds, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.total:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(
    snapshot: Mapping[str, Mapping[str, int]],
    counters: Mapping[str, int],
    histograms: Mapping[str, Histogram],
    worker_id: str,
) -> str:
    """The exposition text for one broker.

    Args:
        snapshot: per limit: capacity, held, waiters (``SlotBroker.snapshot``).
        counters: name -> value, without the ``pgw_gpu_slot_`` prefix and ``_total``.
        histograms: name -> histogram, without the ``pgw_gpu_slot_`` prefix.
        worker_id: the ``worker`` label of the broker-wide series.
    """
    lines: list[str] = []
    gauges = {
        "pgw_gpu_slots": ("capacity", "GPU slots of the limit"),
        "pgw_gpu_slots_held": ("held", "GPU slots held through the broker"),
        "pgw_gpu_slot_waiters": ("waiters", "GPU steps waiting at the broker"),
    }
    for metric, (key, help_text) in gauges.items():
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
        for limit, values in sorted(snapshot.items()):
            lines.append(f'{metric}{{limit="{_label(limit)}"}} {values[key]}')
    worker = f'worker="{_label(worker_id)}"'
    for name, value in sorted(counters.items()):
        metric = f"pgw_gpu_slot_{name}_total"
        lines += [f"# TYPE {metric} counter", f"{metric}{{{worker}}} {value}"]
    for name, histogram in sorted(histograms.items()):
        metric = f"pgw_gpu_slot_{name}"
        lines.append(f"# TYPE {metric} histogram")
        lines += histogram.lines(metric, worker)
    return "\n".join(lines) + "\n"


async def serve_metrics(path: Path, text: Callable[[], str]) -> asyncio.AbstractServer:
    """Answer every HTTP request on the Unix socket ``path`` with ``text()``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (await reader.readline()).strip():  # the request line and headers
                pass
            body = text().encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket of an earlier run
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(answer, path=str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server
