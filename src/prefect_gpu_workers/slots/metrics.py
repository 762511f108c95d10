"""Prometheus metrics of a worker's slot broker, served over HTTP and a Unix socket when asked.

``prefect-gpu-workers worker --metrics-port PORT`` serves the text exposition
format over HTTP on ``0.0.0.0:PORT`` (path ``/metrics``; Prometheus scrapes the
pod's container port ``metrics``); ``--metrics-socket PATH`` serves the same
text on ``PATH`` (mode 0600), readable with
``curl --unix-socket PATH http://localhost/metrics``. Only ``GET /metrics`` is
answered; anything else gets 404.

Metrics (label ``limit``, the limit's name; every family and its type in
:data:`EXPORTED`):
- ``pgw_gpu_slots`` capacity, ``pgw_gpu_slots_held``, ``pgw_gpu_slot_waiters``;
  ``pgw_gpu_slots_active``: Prefect's ``active_slots`` of the limit at the
  broker's last read (every 10 s; a leak shows as active > held for minutes);
- ``pgw_gpu_slot_grants_total``, ``pgw_gpu_slot_reclaimed_total`` (holders that
  died or left holding), ``pgw_gpu_slot_lost_leases_repaired_total`` (label
  ``worker``);
- histograms ``pgw_gpu_slot_wait_seconds`` (asked -> Prefect lease taken) and
  ``pgw_gpu_slot_handoff_seconds`` (a holder let go while others waited -> the
  next lease taken);
- per step (labels ``limit``, ``deployment``, ``flow``, ``task``; ``none``
  where there is none; at most 64 sets per limit, the rest as ``other``; see
  ``slots/accounting.py``): counters ``pgw_gpu_steps_total`` (steps granted),
  ``pgw_gpu_step_waited_seconds_total``, ``pgw_gpu_step_held_slot_seconds_total``
  (seconds held x slots, steps still holding counted up to now), and with NVML
  only ``pgw_gpu_step_busy_slot_seconds_total`` (held slot-seconds weighted by
  the GPU's utilisation: held minus busy is "held but idle") and
  ``pgw_gpu_step_memory_byte_seconds_total`` (memory used x seconds held);
- with NVML only, per GPU (label ``gpu``, the CUDA position):
  ``pgw_gpu_utilization_ratio`` (0..1), ``pgw_gpu_memory_used_bytes``,
  ``pgw_gpu_memory_total_bytes``;
- the worker's drain: ``pgw_worker_draining`` (1 while draining),
  ``pgw_worker_drain_started_timestamp_seconds`` (0 when not draining),
  ``pgw_worker_drain_grace_seconds`` (the drain's budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prefect_gpu_workers.slots.accounting import GpuReading, Key, Usage

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


# Every family a worker can export, and its Prometheus type: the dashboard's
# and the alerts' queries are checked against this.
EXPORTED: dict[str, str] = {
    "pgw_gpu_slots": "gauge",
    "pgw_gpu_slots_held": "gauge",
    "pgw_gpu_slot_waiters": "gauge",
    "pgw_gpu_slots_active": "gauge",
    "pgw_gpu_slot_grants_total": "counter",
    "pgw_gpu_slot_reclaimed_total": "counter",
    "pgw_gpu_slot_lost_leases_repaired_total": "counter",
    "pgw_gpu_slot_wait_seconds": "histogram",
    "pgw_gpu_slot_handoff_seconds": "histogram",
    "pgw_gpu_steps_total": "counter",
    "pgw_gpu_step_waited_seconds_total": "counter",
    "pgw_gpu_step_held_slot_seconds_total": "counter",
    "pgw_gpu_step_busy_slot_seconds_total": "counter",
    "pgw_gpu_step_memory_byte_seconds_total": "counter",
    "pgw_gpu_utilization_ratio": "gauge",
    "pgw_gpu_memory_used_bytes": "gauge",
    "pgw_gpu_memory_total_bytes": "gauge",
    "pgw_worker_draining": "gauge",
    "pgw_worker_drain_started_timestamp_seconds": "gauge",
    "pgw_worker_drain_grace_seconds": "gauge",
}

_HELP = {
    "pgw_gpu_slots": "GPU slots of the limit",
    "pgw_gpu_slots_held": "GPU slots held through the broker",
    "pgw_gpu_slot_waiters": "GPU steps waiting at the broker",
    "pgw_gpu_slots_active": "active slots of the limit in Prefect at the broker's last read",
    "pgw_gpu_slot_grants_total": "grants the broker made",
    "pgw_gpu_slot_reclaimed_total": "holders that died or left holding their slots",
    "pgw_gpu_slot_lost_leases_repaired_total": "slots decremented by hand after Prefect lost "
    "their leases",
    "pgw_gpu_slot_wait_seconds": "seconds from a step's request to its Prefect lease",
    "pgw_gpu_slot_handoff_seconds": "seconds from a holder letting go while others waited to "
    "the next lease",
    "pgw_gpu_steps_total": "GPU steps granted their slots",
    "pgw_gpu_step_waited_seconds_total": "seconds GPU steps waited for their slots",
    "pgw_gpu_step_held_slot_seconds_total": "seconds held x slots held (steps still holding "
    "counted up to now)",
    "pgw_gpu_step_busy_slot_seconds_total": "held slot-seconds weighted by the NVML utilisation "
    "of the step's GPU(s); held minus busy is held but idle",
    "pgw_gpu_step_memory_byte_seconds_total": "GPU memory used on the step's GPU(s) x seconds held",
    "pgw_gpu_utilization_ratio": "NVML utilisation of the GPU (0..1), by CUDA position",
    "pgw_gpu_memory_used_bytes": "GPU memory used, by CUDA position",
    "pgw_gpu_memory_total_bytes": "GPU memory, by CUDA position",
    "pgw_worker_draining": "1 while the worker drains (takes no new flow run)",
    "pgw_worker_drain_started_timestamp_seconds": "unix time the drain began; 0 when not draining",
    "pgw_worker_drain_grace_seconds": "seconds the drain gives the flow runs in flight",
}


def _header(metric: str) -> list[str]:
    return [f"# HELP {metric} {_HELP[metric]}", f"# TYPE {metric} {EXPORTED[metric]}"]


def _number(value: float) -> str:
    """A sample value: integers as such, others with microsecond precision."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}"


@dataclass
class DrainGauges:
    """The worker's drain as gauges: set when the drain begins (SIGTERM, Ctrl-C)."""

    grace_s: float = 0.0
    draining: bool = False
    started_at: float = 0.0  # unix time

    def begin(self, now: float) -> None:
        """The drain began at ``now`` (unix time)."""
        self.draining, self.started_at = True, now

    def lines(self) -> list[str]:
        values = {
            "pgw_worker_draining": 1 if self.draining else 0,
            "pgw_worker_drain_started_timestamp_seconds": self.started_at if self.draining else 0,
            "pgw_worker_drain_grace_seconds": self.grace_s,
        }
        out: list[str] = []
        for metric, value in values.items():
            out += [*_header(metric), f"{metric} {_number(value)}"]
        return out


_USAGE_FAMILIES: tuple[tuple[str, str], ...] = (
    ("pgw_gpu_steps_total", "steps"),
    ("pgw_gpu_step_waited_seconds_total", "waited_s"),
    ("pgw_gpu_step_held_slot_seconds_total", "held_slot_s"),
    ("pgw_gpu_step_busy_slot_seconds_total", "busy_slot_s"),
    ("pgw_gpu_step_memory_byte_seconds_total", "memory_byte_s"),
)
# Only with NVML: without readings a zero would read as "idle".
_MEASURED_ONLY = {"pgw_gpu_step_busy_slot_seconds_total", "pgw_gpu_step_memory_byte_seconds_total"}


def usage_lines(usage: Mapping[Key, Usage], measured: bool) -> list[str]:
    """The per-step families from :meth:`GpuAccounting.usage`.

    Args:
        usage: (limit, labels) -> sums.
        measured: NVML readings were fed in: the busy and memory families are
            rendered (else left out, not zero).
    """
    lines: list[str] = []
    for metric, attribute in _USAGE_FAMILIES:
        if metric in _MEASURED_ONLY and not measured:
            continue
        lines += _header(metric)
        for (limit, labels), sums in sorted(usage.items()):
            series = (
                f'limit="{_label(limit)}",deployment="{_label(labels.deployment)}",'
                f'flow="{_label(labels.flow)}",task="{_label(labels.task)}"'
            )
            lines.append(f"{metric}{{{series}}} {_number(getattr(sums, attribute))}")
    return lines


def gpu_lines(readings: Mapping[int, GpuReading]) -> list[str]:
    """Per-GPU gauges (label ``gpu``, the CUDA position); none without readings."""
    if not readings:
        return []
    values: dict[str, Callable[[GpuReading], float]] = {
        "pgw_gpu_utilization_ratio": lambda reading: reading.utilization,
        "pgw_gpu_memory_used_bytes": lambda reading: reading.memory_used_bytes,
        "pgw_gpu_memory_total_bytes": lambda reading: reading.memory_total_bytes,
    }
    lines: list[str] = []
    for metric, value_of in values.items():
        lines += _header(metric)
        lines += [
            f'{metric}{{gpu="{position}"}} {_number(value_of(reading))}'
            for position, reading in sorted(readings.items())
        ]
    return lines


def render(
    snapshot: Mapping[str, Mapping[str, int]],
    counters: Mapping[str, int],
    histograms: Mapping[str, Histogram],
    worker_id: str,
    usage: Mapping[Key, Usage] | None = None,
    measured: bool = False,
    readings: Mapping[int, GpuReading] | None = None,
    active: Mapping[str, int] | None = None,
) -> str:
    """The exposition text for one broker.

    Args:
        snapshot: per limit: capacity, held, waiters (``SlotBroker.snapshot``).
        counters: name -> value, without the ``pgw_gpu_slot_`` prefix and ``_total``.
        histograms: name -> histogram, without the ``pgw_gpu_slot_`` prefix.
        worker_id: the ``worker`` label of the broker-wide series.
        usage: per (limit, labels) sums (:meth:`GpuAccounting.usage`).
        measured: whether NVML readings were fed to the accounting.
        readings: the last NVML reading per CUDA position.
        active: per limit, Prefect's ``active_slots`` at the broker's last read.
    """
    lines: list[str] = []
    gauges = {
        "pgw_gpu_slots": "capacity",
        "pgw_gpu_slots_held": "held",
        "pgw_gpu_slot_waiters": "waiters",
    }
    for metric, key in gauges.items():
        lines += _header(metric)
        for limit, values in sorted(snapshot.items()):
            lines.append(f'{metric}{{limit="{_label(limit)}"}} {values[key]}')
    if active is not None:
        lines += _header("pgw_gpu_slots_active")
        for limit, value in sorted(active.items()):
            lines.append(f'pgw_gpu_slots_active{{limit="{_label(limit)}"}} {value}')
    worker = f'worker="{_label(worker_id)}"'
    for name, value in sorted(counters.items()):
        metric = f"pgw_gpu_slot_{name}_total"
        lines += [*_header(metric), f"{metric}{{{worker}}} {value}"]
    for name, histogram in sorted(histograms.items()):
        metric = f"pgw_gpu_slot_{name}"
        lines += _header(metric)
        lines += histogram.lines(metric, worker)
    lines += usage_lines(usage or {}, measured)
    lines += gpu_lines(readings or {})
    return "\n".join(lines) + "\n"


# The most a request line and its headers may take; a longer request is refused.
MAX_REQUEST_BYTES = 8192
# A client that has not sent its request by then is dropped (a stuck scraper
# must not hold a connection open for ever).
REQUEST_TIMEOUT_S = 10.0
METRICS_PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def http_answer(request: bytes) -> tuple[int, str]:
    r"""The status and reason phrase a request line and headers get; pure.

    Only ``GET /metrics`` (a query string allowed) is answered with the text.

    Example:
        >>> http_answer(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        (200, 'OK')
        >>> http_answer(b"GET /other HTTP/1.1\r\n\r\n"), http_answer(b"\x00garbage")
        ((404, 'Not Found'), (400, 'Bad Request'))
    """
    line = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return 400, "Bad Request"
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method == b"GET" and target == METRICS_PATH.encode():
        return 200, "OK"
    return 404, "Not Found"


def _response(status: int, reason: str, body: bytes) -> bytes:
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def _discard(reader: asyncio.StreamReader, most: int = 16 * MAX_REQUEST_BYTES) -> None:
    """Read until the client's end of input, or ``most`` bytes."""
    left = most
    while left > 0 and (chunk := await reader.read(min(left, MAX_REQUEST_BYTES))):
        left -= len(chunk)


def _handler(
    text: Callable[[], str],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """One request per connection: read at most MAX_REQUEST_BYTES, answer, close."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await asyncio.wait_for(
                    reader.readuntil(b"\r\n\r\n"), timeout=REQUEST_TIMEOUT_S
                )
            except asyncio.IncompleteReadError as exc:
                # Closed before the blank line: answer what came (a bare
                # request line still names what it wants).
                request = exc.partial
            except asyncio.LimitOverrunError:
                # Read (and drop) what the client sent, boundedly, before the
                # answer: closing on unread input resets the connection and
                # the client would never see why.
                await asyncio.wait_for(_discard(reader), timeout=REQUEST_TIMEOUT_S)
                writer.write(_response(431, "Request Header Fields Too Large", b"too large\n"))
                await writer.drain()
                return
            status, reason = http_answer(request)
            body = text().encode() if status == 200 else f"{reason}\n".encode()
            writer.write(_response(status, reason, body))
            await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # the client left or never asked: nothing to answer
        finally:
            writer.close()

    return answer


async def serve_metrics(path: Path, text: Callable[[], str]) -> asyncio.AbstractServer:
    """Serve ``GET /metrics`` with ``text()`` on the Unix socket ``path`` (mode 0600)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket of an earlier run
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(
            _handler(text), path=str(path), limit=MAX_REQUEST_BYTES
        )
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


async def serve_metrics_http(
    port: int, text: Callable[[], str], host: str = "0.0.0.0"
) -> asyncio.Server:
    """Serve ``GET /metrics`` with ``text()`` over TCP on ``host:port`` (port 0: any free one).

    Every other request gets 404 (400 when it is not HTTP, 431 past
    MAX_REQUEST_BYTES); a bad request never stops the server.

    Example:
        server = await serve_metrics_http(9400, broker.metrics_text)
        port = server.sockets[0].getsockname()[1]
    """
    return await asyncio.start_server(_handler(text), host=host, port=port, limit=MAX_REQUEST_BYTES)
