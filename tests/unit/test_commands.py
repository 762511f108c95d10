"""The worker command lines: one builder, and the CLI accepts what it builds."""

from __future__ import annotations

import pytest

from prefect_gpu_workers.cli import build_parser
from prefect_gpu_workers.commands import (
    CONSOLE_SCRIPT,
    module_program,
    worker_command,
)


def test_pods_and_local_mode_run_the_same_entrypoint_and_the_cli_parses_it() -> None:
    pod = worker_command("gpu-pool", 10, "infer", 300, with_healthcheck=True)
    local = worker_command("gpu-pool", 10, "infer", 300, program=module_program("/py"))
    assert pod[:2] == [CONSOLE_SCRIPT, "worker"]
    assert local[:4] == ["/py", "-m", "prefect_gpu_workers", "worker"]
    assert pod[2:-1] == local[4:]
    args = build_parser().parse_args(pod[1:])
    assert (args.command, args.pool, args.flow_runs, args.limit_prefix) == (
        "worker",
        "gpu-pool",
        10,
        "infer",
    )
    assert (args.wait_timeout, args.with_healthcheck) == (300.0, True)
    assert build_parser().parse_args(local[3:]).with_healthcheck is False


@pytest.mark.parametrize(
    ("flow_runs", "wait_timeout_s", "message"),
    [(0, 1, "flow_runs must be at least 1"), (1, -1, "wait_timeout_s must not be negative")],
)
def test_entrypoint_command_rejects_what_the_cli_would(
    flow_runs: int, wait_timeout_s: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        worker_command("p", flow_runs, "gpu", wait_timeout_s)


def test_a_worker_without_its_slot_broker_is_asked_for_explicitly() -> None:
    assert "--no-slot-broker" not in worker_command("p", 4, "gpu", 1)
    command = worker_command("p", 4, "gpu", 1, slot_broker=False)
    assert command[-1] == "--no-slot-broker"
    assert build_parser().parse_args(command[1:]).slot_broker is False
    assert build_parser().parse_args(worker_command("p", 4, "gpu", 1)[1:]).slot_broker is True


def test_the_launcher_and_its_preloads_reach_the_worker_parser() -> None:
    default = build_parser().parse_args(worker_command("p", 4, "gpu", 1)[1:])
    assert (default.launcher, default.preload) == ("fork", None)
    command = worker_command("p", 4, "gpu", 1, launcher="subprocess", preload=["a.b", "c"])
    parsed = build_parser().parse_args(command[1:])
    assert (parsed.launcher, parsed.preload) == ("subprocess", ["a.b", "c"])
    with pytest.raises(ValueError, match="launcher must be one of"):
        worker_command("p", 4, "gpu", 1, launcher="spawn")
