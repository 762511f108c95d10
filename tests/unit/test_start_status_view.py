"""The `status` table and JSON, from a status read (no server needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from rich.console import Console

from prefect_gpu_workers.service.plan import WorkerSighting
from prefect_gpu_workers.service.status import (
    LimitStatus,
    LimitUse,
    PoolStatus,
    render_status,
    status_json,
)

NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def _status() -> PoolStatus:
    live = WorkerSighting("gpu-pool", "box-a-gpu0", True, NOW - timedelta(seconds=4), 30.0)
    gone = WorkerSighting("gpu-pool", "box-b", False, NOW - timedelta(minutes=42), 30.0)
    stray = WorkerSighting("gpu-pool", "laptop", True, NOW - timedelta(seconds=12), 30.0)
    return PoolStatus(
        limits=(
            LimitStatus(
                "gpu",
                "box-a-gpu0",
                LimitUse("gpu:box-a-gpu0", 4, 4, True),
                LimitUse("gpu-memory:box-a-gpu0", 80, 60, True),
                (live,),
            ),
            LimitStatus("gpu", "box-b", LimitUse("gpu:box-b", 2, 0, False), None, (gone,)),
            LimitStatus("gpu", "orphan", LimitUse("gpu:orphan", 2, 1, True), None, ()),
            LimitStatus("gpu", "lost", None, LimitUse("gpu-memory:lost", 40, 0, True), ()),
        ),
        workers_without_limit=(stray,),
    )


def _text(status: PoolStatus) -> list[str]:
    console = Console(record=True, width=120)
    console.print(render_status(status, now=NOW))
    return console.export_text().splitlines()


def test_one_row_per_limit_with_its_worker_and_heartbeat_age() -> None:
    lines = _text(_status())
    row = next(line for line in lines if "gpu:box-a-gpu0" in line)
    for cell in ("4/4", "60/80 GiB", "box-a-gpu0", "gpu-pool", "ONLINE", "4s ago"):
        assert cell in row
    inactive = next(line for line in lines if "gpu:box-b" in line)
    for cell in ("0/2 (inactive)", "OFFLINE", "42m ago"):
        assert cell in inactive
    assert "no worker" in next(line for line in lines if "gpu:orphan" in line)
    # A memory limit whose slot limit is gone: a row of its own, no slots.
    lost = next(line for line in lines if "gpu-memory:lost" in line).split()
    assert lost[2:7] == ["│", "-", "│", "0/40", "GiB"]
    stray = next(line for line in lines if "laptop" in line)
    assert "none" in stray
    assert "12s ago" in stray


def test_json_has_the_same_facts() -> None:
    data = status_json(_status())
    first = data["limits"][0]
    assert (first["name"], first["size"], first["in_use"], first["active"]) == (
        "gpu:box-a-gpu0",
        4,
        4,
        True,
    )
    assert first["workers"][0]["status"] == "ONLINE"
    assert first["workers"][0]["last_heartbeat"] == (NOW - timedelta(seconds=4)).isoformat()
    assert first["memory"] == {
        "name": "gpu-memory:box-a-gpu0",
        "size_gib": 80,
        "in_use_gib": 60,
        "active": True,
    }
    assert data["limits"][1]["memory"] is None
    assert data["limits"][2]["workers"] == []
    lost = data["limits"][3]
    assert (lost["name"], lost["size"], lost["memory"]["size_gib"]) == ("gpu-memory:lost", None, 40)
    assert [w["name"] for w in data["workers_without_limit"]] == ["laptop"]
