"""The progress line says when the Prefect API is silent, at once, without waiting for it."""

from __future__ import annotations

import io

from rich.console import Console

from prefect_gpu_workers.local.plan import plan_workers
from prefect_gpu_workers.local.views import API_SILENCE_NOTICE_S, ProgressView, api_silence_text

PLANS = plan_workers(["local-1"], slots=2, flow_runs=4)


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_silence_is_named_once_it_lasts() -> None:
    assert api_silence_text(API_SILENCE_NOTICE_S - 0.1) == ""
    assert api_silence_text(20.4) == "Prefect API not answering for 20 s"


def test_plain_progress_prints_at_once_when_the_api_falls_silent_and_when_it_answers() -> None:
    console, out = plain_console()
    with ProgressView(console, "demo", PLANS, plain_every_s=3600) as progress:
        progress([], {"gpu:local-1": 1}, 1.0, 0.5)  # first line: printed
        progress([], {"gpu:local-1": 1}, 2.0, 0.5)  # nothing new, an hour to the next
        progress([], {"gpu:local-1": 1}, 25.0, 23.0)  # silent: printed at once
        progress([], {"gpu:local-1": 1}, 26.0, 0.2)  # answers again: printed at once
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert "not answering" not in lines[0]
    assert "Prefect API not answering for 23 s" in lines[1]
    assert "gpu:local-1 1/2" in lines[1]
    assert "not answering" not in lines[2]
