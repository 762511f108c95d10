"""The CLI's checks that need no server: options, worker identity, what it imports."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from rich.console import Console

from prefect_gpu_workers.cli import build_parser

CLI = [sys.executable, "-m", "prefect_gpu_workers"]


def test_bad_options_fail_before_starting_anything() -> None:
    result = subprocess.run(
        [*CLI, "demo", "--worker-prefix", "Not_Valid"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "not a DNS subdomain" in result.stderr


def test_cli_and_its_worker_parser_import_no_prefect() -> None:
    # `--help` and the entrypoint's argument parsing stay fast: local mode and
    # Prefect are imported only when a command runs.
    code = (
        "import sys; from prefect_gpu_workers.cli import build_parser; "
        "build_parser().parse_args(['worker', '--pool', 'p', '--flow-runs', '1']); "
        "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_no_limit_refusal_does_not_depend_on_this_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect_gpu_workers.gpu import GpuDevice, GpuInventory
    from prefect_gpu_workers.local import demo

    console = Console(record=True, width=200)
    monkeypatch.setattr(demo, "detect_gpus", lambda: GpuInventory(unavailable_reason="no driver"))
    assert demo.run_demo(demo.DemoOptions(no_limit=True), console) == 2
    assert "needs an NVIDIA GPU" in console.export_text()
    # With a GPU, --simulate is what it refuses (the real steps are the point).
    one_gpu = GpuInventory(devices=(GpuDevice(0, "H100", 81559),))
    monkeypatch.setattr(demo, "detect_gpus", lambda: one_gpu)
    simulated = replace(demo.DemoOptions().pipeline, simulate=True)
    options = demo.DemoOptions(no_limit=True, pipeline=simulated)
    assert demo.run_demo(options, console) == 2
    assert "drop --simulate" in console.export_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--timeline", "t.svg"], "must end in .png or .html"),
        (["bench", "--timeline", "t.jpg"], "must end in .png or .html"),
        (["demo", "--gpu-memory-fraction", "1.5"], "below 1"),
    ],
)
def test_timeline_and_memory_options_are_checked(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
