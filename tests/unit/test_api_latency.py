"""Percentiles of API request durations, as the demo and bench report them."""

from __future__ import annotations

from prefect_gpu_workers.local.watch import percentile, summarize_latencies


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values, 0.50) == 10.0
    assert percentile(values, 0.95) == 19.0
    assert percentile(values, 1.0) == 20.0
    assert percentile([3.0], 0.95) == 3.0


def test_no_requests_no_figures() -> None:
    summary = summarize_latencies([])
    assert summary.requests == 0
    assert summary.p50_s is None
    assert summary.p95_s is None
    assert summary.max_s is None


def test_summary_of_durations() -> None:
    summary = summarize_latencies([0.2, 0.1, 0.4, 0.3])
    assert (summary.requests, summary.p50_s, summary.p95_s, summary.max_s) == (4, 0.2, 0.4, 0.4)
