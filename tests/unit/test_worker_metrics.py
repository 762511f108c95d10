"""The worker's metrics over HTTP: the ``--metrics-port`` flag and the server that answers it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefect_gpu_workers.cli import build_parser
from prefect_gpu_workers.commands import worker_command
from prefect_gpu_workers.slots.accounting import GpuAccounting, GpuReading, StepLabels
from prefect_gpu_workers.slots.metrics import (
    EXPORTED,
    MAX_REQUEST_BYTES,
    DrainGauges,
    Histogram,
    http_answer,
    render,
    serve_metrics_http,
)

WORKER_ARGS = ["worker", "--pool", "p", "--flow-runs", "1"]


def test_the_command_builder_passes_the_metrics_port() -> None:
    command = worker_command("p", 1, "gpu", 60, metrics_port=9400)
    assert command[-2:] == ["--metrics-port", "9400"]
    assert "--metrics-port" not in worker_command("p", 1, "gpu", 60)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_the_command_builder_refuses_a_port_outside_1_to_65535(port: int) -> None:
    with pytest.raises(ValueError, match="metrics port"):
        worker_command("p", 1, "gpu", 60, metrics_port=port)


def test_the_worker_subcommand_parses_what_the_builder_builds() -> None:
    command = worker_command("p", 1, "gpu", 60, metrics_port=9400)
    args = build_parser().parse_args(command[1:])
    assert args.metrics_port == 9400
    assert build_parser().parse_args(WORKER_ARGS).metrics_port is None


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_the_worker_subcommand_refuses_a_bad_port(port: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*WORKER_ARGS, "--metrics-port", port])


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", 200),
        (b"GET /other HTTP/1.1\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\n\r\n", 404),
        (b"", 400),
        (b"\xff\xfe garbage", 400),
        (b"GET /metrics\r\n\r\n", 400),
    ],
)
def test_only_get_metrics_is_answered(request_bytes: bytes, status: int) -> None:
    assert http_answer(request_bytes)[0] == status


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    answer = await reader.read()
    writer.close()
    return answer


def test_the_http_server_serves_metrics_and_survives_bad_requests() -> None:
    async def scenario() -> list[bytes]:
        server = await serve_metrics_http(0, lambda: "pgw_x 1\n", host="127.0.0.1")
        port = server.sockets[0].getsockname()[1]
        try:
            return [
                await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"),
                await _exchange(port, b"GET /other HTTP/1.1\r\n\r\n"),
                await _exchange(port, b"\x00\x01 not http at all"),
                await _exchange(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_BYTES),
                await _exchange(port, b""),
                # Still serving after all of that.
                await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"),
            ]
        finally:
            server.close()
            await server.wait_closed()

    ok, other, garbage, huge, empty, again = asyncio.run(scenario())
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
    assert ok.endswith(b"\r\n\r\npgw_x 1\n")
    assert b"Content-Type: text/plain; version=0.0.4" in ok
    assert other.startswith(b"HTTP/1.1 404 ")
    assert garbage.startswith(b"HTTP/1.1 400 ")
    assert huge.startswith(b"HTTP/1.1 431 ")
    assert empty.startswith(b"HTTP/1.1 400 ")
    assert again == ok


def _families(text: str) -> dict[str, Any]:
    """The text parsed back by Prometheus' own client library (its format checked)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(family: Any, suffix: str = "", **labels: str) -> float:
    for sample in family.samples:
        if sample.name == family.name + suffix and sample.labels == labels:
            return float(sample.value)
    raise AssertionError(f"no {family.name}{suffix} {labels}")


def test_the_render_parses_back_with_every_family_in_exported() -> None:
    accounting = GpuAccounting()
    labels = StepLabels.of("train", "pipeline", "fit")
    accounting.sample({0: GpuReading(0.25, 2 * 1024**3, 80 * 1024**3)}, now=0.0)
    accounting.granted(1, "gpu:w-1", labels, slots=1, waited_s=0.5, now=0.0, gpu=0)
    accounting.granted(2, "gpu:w-1", StepLabels.of(None, "adhoc", None), 1, 0.0, now=2.0)
    drain = DrainGauges(grace_s=45.0)
    drain.begin(1_700_000_000.0)
    text = (
        render(
            {"gpu:w-1": {"capacity": 2, "held": 2, "waiters": 0, "waiting_slots": 0}},
            {"grants": 2, "reclaimed": 0, "lost_leases_repaired": 0},
            {"wait_seconds": Histogram(), "handoff_seconds": Histogram()},
            "w-1",
            usage=accounting.usage(now=4.0),
            measured=accounting.measured,
            readings=accounting.readings,
            active={"gpu:w-1": 3},
        )
        + "\n".join(drain.lines())
        + "\n"
    )
    families = _families(text)
    # prometheus_client names counters without their _total.
    exported = {name.removesuffix("_total") for name in EXPORTED}
    assert set(families) == exported
    for name, kind in EXPORTED.items():
        assert families[name.removesuffix("_total")].type == kind
    step = {"limit": "gpu:w-1", "deployment": "train", "flow": "pipeline", "task": "fit"}
    held = families["pgw_gpu_step_held_slot_seconds"]
    assert _value(held, "_total", **step) == 4.0
    assert _value(families["pgw_gpu_step_busy_slot_seconds"], "_total", **step) == 1.0
    assert _value(families["pgw_gpu_step_waited_seconds"], "_total", **step) == 0.5
    assert _value(families["pgw_gpu_steps"], "_total", **step) == 1
    assert _value(families["pgw_gpu_step_memory_byte_seconds"], "_total", **step) == 4 * 2 * 1024**3
    adhoc = {"limit": "gpu:w-1", "deployment": "none", "flow": "adhoc", "task": "none"}
    assert _value(held, "_total", **adhoc) == 2.0
    assert _value(families["pgw_gpu_slots_active"], limit="gpu:w-1") == 3
    assert _value(families["pgw_gpu_utilization_ratio"], gpu="0") == 0.25
    assert _value(families["pgw_gpu_memory_total_bytes"], gpu="0") == 80 * 1024**3
    assert _value(families["pgw_worker_draining"]) == 1
    assert _value(families["pgw_worker_drain_started_timestamp_seconds"]) == 1_700_000_000
    assert _value(families["pgw_worker_drain_grace_seconds"]) == 45
    assert all(f"# HELP {name} " in text for name in EXPORTED)


def test_without_nvml_busy_and_memory_are_left_out_not_zero() -> None:
    accounting = GpuAccounting()
    accounting.granted(1, "gpu:w-1", StepLabels(), slots=1, waited_s=0.0, now=0.0)
    text = render({}, {}, {}, "w-1", usage=accounting.usage(now=1.0), measured=False)
    families = _families(text)
    assert "pgw_gpu_step_held_slot_seconds" in families
    assert "pgw_gpu_step_busy_slot_seconds" not in families
    assert "pgw_gpu_utilization_ratio" not in families
    idle_drain = _families("\n".join(DrainGauges(grace_s=30).lines()) + "\n")
    assert _value(idle_drain["pgw_worker_draining"]) == 0
    assert _value(idle_drain["pgw_worker_drain_started_timestamp_seconds"]) == 0


def test_label_values_are_escaped() -> None:
    accounting = GpuAccounting()
    odd = StepLabels.of('a "quoted"\\name', "line\nbreak", "t")
    accounting.granted(1, "gpu:w-1", odd, slots=1, waited_s=0.0, now=0.0)
    families = _families(render({}, {}, {}, "w-1", usage=accounting.usage(now=1.0)))
    sample = families["pgw_gpu_steps"].samples[0]
    assert sample.labels["deployment"] == 'a "quoted"\\name'
    assert sample.labels["flow"] == "line\nbreak"
