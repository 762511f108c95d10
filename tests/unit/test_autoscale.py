"""Backlog autoscaling decisions (pure): up at once, down after the delay, never flapping."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from pgw_operator.autoscale import (
    AutoscaleMemory,
    Autoscaler,
    AutoscalingSpec,
    Backlog,
    ScaleDecision,
    autoscaling_of,
    autoscaling_status,
    decide,
    runs_per_worker,
    workers_needed,
)


def run_passes(
    spec: AutoscalingSpec,
    backlogs: Iterable[tuple[float, int]],
    per_worker: int = 10,
    start: int = 0,
) -> list[tuple[float, ScaleDecision]]:
    """Feed (time, queued runs) passes through one autoscaler, applying each decision."""
    scaler = Autoscaler()
    replicas = start
    decisions = []
    for now, runs in backlogs:
        decision = scaler.decide(spec, Backlog(scheduled=runs), per_worker, replicas, now)
        replicas = decision.desired
        decisions.append((now, decision))
    return decisions


def every(seconds: float, until: float, runs: int, start: float = 0.0) -> list[tuple[float, int]]:
    count = int((until - start) / seconds)
    return [(start + k * seconds, runs) for k in range(count)]


def test_a_backlog_of_30_runs_scales_from_zero_at_once() -> None:
    spec = AutoscalingSpec(max_replicas=8)
    decision, memory = decide(spec, Backlog(scheduled=30), 10, 0, AutoscaleMemory(), now=0.0)
    assert (decision.current, decision.desired, decision.reason) == (0, 3, "ScaledUp")
    assert decision.changed
    assert "30 runs (30 scheduled or late, 0 pending, 0 running)" in decision.message
    assert memory.last_change_at == 0.0
    # Fewer runs per worker: more workers, still within maxReplicas.
    smaller, _ = decide(spec, Backlog(scheduled=30), 4, 0, AutoscaleMemory(), now=0.0)
    assert smaller.desired == 8


def test_every_kind_of_waiting_or_running_run_counts() -> None:
    backlog = Backlog(scheduled=5, pending=3, running=12)
    assert backlog.total == 20
    decision, _ = decide(AutoscalingSpec(max_replicas=10), backlog, 10, 0, AutoscaleMemory(), 0.0)
    assert decision.desired == 2


def test_scales_to_zero_only_after_the_delay_without_backlog() -> None:
    spec = AutoscalingSpec(max_replicas=8, scale_down_delay_s=300, cooldown_s=15)
    passes = [(0.0, 30), *every(10, 900, 0, start=10)]
    decisions = run_passes(spec, passes)
    assert decisions[0][1].desired == 3
    # The last pass that saw 30 runs was at t=0: nothing changes before t=300.
    before = [d for t, d in decisions if 0 < t < 300]
    assert before
    assert all(d.desired == 3 and d.reason == "ScaleDownDelayed" for d in before)
    assert before[0].recheck_after_s == pytest.approx(290)
    down = [(t, d) for t, d in decisions if d.changed and t > 0]
    assert [(t, d.desired, d.reason) for t, d in down] == [(300, 0, "ScaledToZero")]
    assert "for 300s" in down[0][1].message
    # Then it stays at zero, steady.
    assert all(d.desired == 0 and d.reason == "Steady" for t, d in decisions if t > 300)


def test_new_runs_during_the_delay_restart_it() -> None:
    spec = AutoscalingSpec(max_replicas=8, scale_down_delay_s=60, cooldown_s=0)
    passes = [(0.0, 30), (30.0, 0), (50.0, 25), (70.0, 0), (100.0, 0), (110.0, 0), (111.0, 0)]
    decisions = dict(run_passes(spec, passes))
    assert [decisions[t].desired for t in (0.0, 30.0, 50.0, 70.0, 100.0)] == [3, 3, 3, 3, 3]
    # The need of 3 was last seen at t=50: due at 110.
    assert decisions[70.0].recheck_after_s == pytest.approx(40)
    assert decisions[110.0].desired == 0


def test_a_backlog_oscillating_around_a_threshold_never_flaps() -> None:
    # 30 runs need 3 workers, 31 need 4: the count rises once and stays.
    spec = AutoscalingSpec(max_replicas=10, scale_down_delay_s=120, cooldown_s=15)
    passes = [(t, 30 if k % 2 else 31) for k, (t, _) in enumerate(every(10, 3600, 0))]
    decisions = run_passes(spec, passes)
    changes = [(t, d.current, d.desired) for t, d in decisions if d.changed]
    assert changes == [(0, 0, 4)]
    assert all(d.desired == 4 for _, d in decisions)


def test_a_backlog_that_comes_and_goes_faster_than_the_delay_keeps_the_workers() -> None:
    spec = AutoscalingSpec(max_replicas=10, scale_down_delay_s=300)
    # 20 runs for 10 s, then nothing for 4 minutes, over and over.
    passes = [(t, 20 if t % 250 == 0 else 0) for t, _ in every(10, 7200, 0)]
    decisions = run_passes(spec, passes)
    assert [(d.current, d.desired) for _, d in decisions if d.changed] == [(0, 2)]


def test_bounds_are_respected_whatever_the_backlog() -> None:
    spec = AutoscalingSpec(
        min_replicas=2, max_replicas=5, scale_down_delay_s=30, cooldown_s=0, scale_up_step=2
    )
    rng = random.Random(10)  # a fixed sequence: the same every run
    passes = [(float(t), rng.choice([0, 0, 1, 9, 25, 1000])) for t in range(0, 3000, 7)]
    decisions = run_passes(spec, passes, start=0)
    assert decisions[0][1].reason == "BelowMinReplicas"
    assert all(2 <= d.desired <= 5 for _, d in decisions)
    assert {d.desired for _, d in decisions} >= {2, 5}
    assert any(d.reason == "AtMaxReplicas" for _, d in decisions)


def test_a_count_outside_the_bounds_is_corrected_at_once() -> None:
    spec = AutoscalingSpec(min_replicas=1, max_replicas=4, cooldown_s=600)
    memory = AutoscaleMemory(last_change_at=0.0)  # in cooldown: bounds still win
    above, _ = decide(spec, Backlog(scheduled=100), 10, 9, memory, now=1.0)
    assert (above.desired, above.reason) == (4, "AboveMaxReplicas")
    below, _ = decide(spec, Backlog(), 10, 0, memory, now=1.0)
    assert (below.desired, below.reason) == (1, "BelowMinReplicas")


def test_steps_and_cooldown_pace_a_large_scale_up() -> None:
    spec = AutoscalingSpec(max_replicas=20, scale_up_step=4, cooldown_s=30)
    decisions = run_passes(spec, every(5, 200, 200))
    changes = [(t, d.desired) for t, d in decisions if d.changed]
    assert changes == [(0, 4), (30, 8), (60, 12), (90, 16), (120, 20)]
    cooling = next(d for t, d in decisions if t == 5)
    assert cooling.reason == "CoolingDown"
    assert cooling.recheck_after_s == pytest.approx(25)


def test_scale_down_step_walks_down() -> None:
    spec = AutoscalingSpec(max_replicas=10, scale_down_delay_s=60, cooldown_s=20, scale_down_step=3)
    decisions = run_passes(spec, [(0.0, 100), *every(10, 300, 0, start=10)])
    changes = [(t, d.desired) for t, d in decisions if d.changed]
    assert changes == [(0, 10), (60, 7), (80, 4), (100, 1), (120, 0)]


def test_after_a_restart_the_current_count_is_kept_for_the_delay() -> None:
    spec = AutoscalingSpec(max_replicas=8, scale_down_delay_s=300)
    decision, memory = decide(spec, Backlog(), 10, 4, AutoscaleMemory(), now=1000.0)
    assert (decision.desired, decision.reason) == (4, "ScaleDownDelayed")
    later, _ = decide(spec, Backlog(), 10, 4, memory, now=1300.0)
    assert (later.desired, later.reason) == (0, "ScaledToZero")


def test_memory_stays_small_however_many_passes() -> None:
    spec = AutoscalingSpec(max_replicas=50, scale_down_delay_s=600)
    rng = random.Random(3)
    memory = AutoscaleMemory()
    longest = 0
    for k in range(20000):
        _, memory = decide(spec, Backlog(scheduled=rng.randrange(500)), 10, 5, memory, k * 0.1)
        longest = max(longest, len(memory.needs))
    assert longest <= 51  # at most one entry per distinct need


def test_runs_per_worker_from_flow_runs_and_gpu_slots() -> None:
    plain = AutoscalingSpec(max_replicas=4)
    assert runs_per_worker(plain, 10, 2) == 10
    assert runs_per_worker(AutoscalingSpec(4, target_runs_per_worker=4), 10, None) == 4
    # Never more than a worker takes.
    assert runs_per_worker(AutoscalingSpec(4, target_runs_per_worker=50), 10, None) == 10
    by_slots = AutoscalingSpec(4, runs_per_gpu_slot=2)
    assert runs_per_worker(by_slots, 10, 3) == 6
    assert runs_per_worker(by_slots, 10, None) == 10  # no worker sized yet
    assert workers_needed(0, 10) == 0
    assert workers_needed(30, 10) == 3
    assert workers_needed(31, 10) == 4


def test_spec_parsing_and_status() -> None:
    assert autoscaling_of({"replicas": 2}) is None
    spec = autoscaling_of(
        {
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 6,
                "scaleDownDelaySeconds": 30,
                "workQueues": ["high", "low"],
                "scaleUpStep": 2,
            }
        }
    )
    assert spec == AutoscalingSpec(
        max_replicas=6,
        min_replicas=1,
        scale_down_delay_s=30,
        work_queues=("high", "low"),
        scale_up_step=2,
    )
    decision, _ = decide(spec, Backlog(scheduled=7, running=3), 10, 1, AutoscaleMemory(), 0.0)
    status = autoscaling_status(decision)
    assert status["desiredReplicas"] == 1
    assert status["reason"] == "Steady"
    assert status["backlog"] == {"scheduled": 7, "pending": 0, "running": 3}


def test_a_waiting_decision_says_the_same_thing_every_pass() -> None:
    """Its message becomes status: one that changed by itself would rewrite status each pass."""
    spec = AutoscalingSpec(max_replicas=8, scale_down_delay_s=300, cooldown_s=15)
    decisions = run_passes(spec, [(0.0, 30), *every(10, 200, 0, start=10)])
    waiting = {(d.reason, d.message) for t, d in decisions if t > 0}
    assert len(waiting) == 1
    ((reason, _),) = waiting
    assert reason == "ScaleDownDelayed"
    cooling = run_passes(AutoscalingSpec(max_replicas=8, cooldown_s=60),
                         [(0.0, 10), (5.0, 30), (9.0, 30)])  # fmt: skip
    assert cooling[1][1].message == cooling[2][1].message
    assert cooling[1][1].reason == "CoolingDown"
