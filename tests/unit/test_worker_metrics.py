"""The worker's metrics over HTTP: the ``--metrics-port`` flag and the server that answers it."""

from __future__ import annotations

import asyncio

import pytest

from prefect_gpu_workers.cli import build_parser
from prefect_gpu_workers.commands import worker_command
from prefect_gpu_workers.slots.metrics import (
    MAX_REQUEST_BYTES,
    http_answer,
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
