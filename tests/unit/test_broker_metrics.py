"""The broker's Prometheus text: gauges per limit, counters and histograms per worker."""

from __future__ import annotations

from prefect_gpu_workers.slots.metrics import Histogram, render


def test_histogram_is_cumulative_and_bounded() -> None:
    histogram = Histogram(bounds=(0.01, 0.1, 1.0))
    for value in (0.004, 0.05, 0.05, 3.0):
        histogram.observe(value)
    assert histogram.counts == [1, 3, 3]
    assert histogram.count == 4
    assert round(histogram.total, 3) == 3.104


def test_render_names_every_series() -> None:
    handoff = Histogram(bounds=(0.05,))
    handoff.observe(0.02)
    text = render(
        {"gpu:w-1": {"capacity": 2, "held": 1, "waiters": 3, "waiting_slots": 4}},
        {"grants": 7},
        {"handoff_seconds": handoff},
        worker_id="w-1",
    )
    lines = set(text.splitlines())
    assert 'pgw_gpu_slots{limit="gpu:w-1"} 2' in lines
    assert 'pgw_gpu_slots_held{limit="gpu:w-1"} 1' in lines
    assert 'pgw_gpu_slot_waiters{limit="gpu:w-1"} 3' in lines
    assert 'pgw_gpu_slot_grants_total{worker="w-1"} 7' in lines
    assert 'pgw_gpu_slot_handoff_seconds_bucket{worker="w-1",le="0.05"} 1' in lines
    assert 'pgw_gpu_slot_handoff_seconds_bucket{worker="w-1",le="+Inf"} 1' in lines
    assert 'pgw_gpu_slot_handoff_seconds_count{worker="w-1"} 1' in lines
    assert text.endswith("\n")
