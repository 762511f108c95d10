"""``python -m slot_simulation`` (what ``hack/simulate`` runs): many seeds, a summary.

hack/simulate [--seeds N] [--first S] [--json]   run seeds S .. S+N-1
hack/simulate --seed S --trace            replay one seed, print its schedule and trace
hack/simulate --placement [...]           the same schedules, steps also placed by GPU
                                          memory and holding a licence seat
hack/simulate --workers [...]             the same for the workers' drain and journal
                                          (workers.py) instead of the slot broker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

from .schedule import draw_schedule
from .simulate import Report, quiet_broker_logs, simulate
from .workers import draw_worker_schedule, quiet_worker_logs, simulate_workers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/simulate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds (1000)")
    parser.add_argument("--first", type=int, default=0, help="the first seed (0)")
    parser.add_argument("--seed", type=int, help="replay this one seed")
    parser.add_argument("--trace", action="store_true", help="print the replayed seed's trace")
    parser.add_argument("--json", action="store_true", help="the summary as one JSON object")
    parser.add_argument(
        "--workers", action="store_true", help="simulate workers drained, killed, restarted"
    )
    parser.add_argument(
        "--placement",
        action="store_true",
        help="steps also ask for GPU memory (and some a licence seat) beside their slots",
    )
    args = parser.parse_args(argv)
    with quiet_broker_logs(), quiet_worker_logs():
        if args.workers and args.seed is not None:
            return replay_workers(args.seed, args.trace)
        if args.workers:
            return sweep_workers(args.first, args.seeds, args.json)
        if args.seed is not None:
            return replay(args.seed, args.trace, args.placement)
        return sweep(args.first, args.seeds, args.json, args.placement)


def replay(seed: int, trace: bool, placement: bool = False) -> int:
    schedule = draw_schedule(seed, placement)
    report = simulate(schedule)
    print(schedule.describe())
    if trace:
        print("\n".join(report.trace))
    print(summary_line(report))
    for violation in report.violations:
        print(f"  VIOLATED {violation}")
    return 0 if report.ok else 1


def progress(
    i: int, count: int, started: float, failed: dict[str, list[int]], what: str, every: int
) -> None:
    """A sweep's progress line on stderr, every ``every`` schedules and at the end."""
    if i % every == 0 or i == count:
        violations = sum(len(seeds) for seeds in failed.values())
        print(f"  {i}/{count} {what}, {time.perf_counter() - started:.1f} s, "
              f"{violations} violation(s)", file=sys.stderr, flush=True)  # fmt: skip


def replay_workers(seed: int, trace: bool) -> int:
    report = simulate_workers(draw_worker_schedule(seed))
    print(report.schedule.describe())
    if trace:
        print("\n".join(report.trace))
    print(
        f"seed {seed}: {'ok' if report.ok else 'FAILED'}, {report.requests} requests "
        f"({report.faults} faulted), runs end {report.outcomes}, digest {report.digest()}"
    )
    for violation in report.violations:
        print(f"  VIOLATED {violation}")
    return 0 if report.ok else 1


WORKER_INVARIANTS = ("no run left Running", "recorded until settled", "others' runs left alone",
                     "drain within its margin")  # fmt: skip


def sweep_workers(first: int, count: int, as_json: bool = False) -> int:
    started = time.perf_counter()
    failed: dict[str, list[int]] = {}
    totals: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for i, seed in enumerate(range(first, first + count), 1):
        schedule = draw_worker_schedule(seed)
        report = simulate_workers(schedule)
        outcomes.update(report.outcomes)
        totals.update(requests=report.requests, faults=report.faults, killed=int(report.killed),
                      outages=int(schedule.outage is not None), twins=int(schedule.twin_runs > 0),
                      moved=int(schedule.moved is not None), runs=len(schedule.runs))  # fmt: skip
        for violation in report.violations:
            failed.setdefault(violation.invariant, []).append(seed)
        progress(i, count, started, failed, "worker schedules", every=500)
    summary = {
        "seeds": [first, first + count - 1],
        "seconds": round(time.perf_counter() - started, 1),
        "flow_runs": totals["runs"],
        "runs_ended": dict(sorted(outcomes.items())),
        "requests": totals["requests"],
        "faulted_requests": totals["faults"],
        "killed_mid_drain": totals["killed"],
        "prefect_outages": totals["outages"],
        "with_a_live_twin": totals["twins"],
        "with_a_run_moved": totals["moved"],
        "violations": {k: len(failed.get(k, [])) for k in WORKER_INVARIANTS},
        "failing_seeds": {k: v[:20] for k, v in failed.items()},
    }
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:<18} {value}")
        if failed:
            worst = min(min(s) for s in failed.values())
            print(f"replay: hack/simulate --workers --seed {worst} --trace")
    return 1 if failed else 0


def summary_line(report: Report) -> str:
    return (f"seed {report.schedule.seed}: {'ok' if report.ok else 'FAILED'}, "
            f"{report.requests} requests ({report.faults} faulted, {report.orphans} orphan "
            f"lease(s){', one forgotten by a restart' if report.prefect_forgot_orphan else ''}"
            f"{', ' + report.crossed if report.crossed else ''}), "
            f"{report.grants} grants, "
            f"{report.leases_passed} leases passed, {report.virtual_s:.0f} virtual s, "
            f"digest {report.digest()}")  # fmt: skip


INVARIANTS = ("within the limit", "counted", "no repossession", "no leak", "progress",
              "no crash", "release answered")  # fmt: skip
PLACEMENT_INVARIANTS = ("within the GPU", "within the licence")


def sweep(first: int, count: int, as_json: bool = False, placement: bool = False) -> int:
    started = time.perf_counter()
    failed: dict[str, list[int]] = {}
    totals: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    events: Counter[str] = Counter()
    crossings: Counter[str] = Counter()
    invariants = INVARIANTS + (PLACEMENT_INVARIANTS if placement else ())
    for i, seed in enumerate(range(first, first + count), 1):
        schedule = draw_schedule(seed, placement)
        report = simulate(schedule)
        faults.update(report.fault_kinds)
        events.update(e.kind.value for e in schedule.events)
        if schedule.lease_storage == "file":
            events.update(f"{e.kind.value} (file lease storage)" for e in schedule.events
                          if e.kind.value == "restart")  # fmt: skip
        totals.update(requests=report.requests, faults=report.faults, grants=report.grants,
                      passed=report.leases_passed, virtual_s=int(report.virtual_s),
                      orphans=report.orphans, forgot=int(report.prefect_forgot_orphan),
                      crossed=int(report.crossed is not None))  # fmt: skip
        if report.crossed is not None:
            crossings[report.crossed] += 1
        for violation in report.violations:
            failed.setdefault(violation.invariant, []).append(seed)
        progress(i, count, started, failed, "seeds", every=100)
    elapsed = time.perf_counter() - started
    if as_json:
        print(json.dumps({
            "seeds": [first, first + count - 1],
            "seconds": round(elapsed, 1),
            "virtual_hours": round(totals["virtual_s"] / 3600, 1),
            "requests": totals["requests"],
            "faults": dict(sorted(faults.items())),
            "server_events": dict(sorted(events.items())),
            "grants": totals["grants"],
            "leases_passed": totals["passed"],
            "orphan_leases": totals["orphans"],
            "schedules_where_a_restart_forgot_an_orphan": totals["forgot"],
            "schedules_where_a_delayed_request_crossed": dict(crossings),
            "violations": {k: len(failed.get(k, [])) for k in invariants},
            "failing_seeds": {k: v[:20] for k, v in failed.items()},
            "placement": placement,
        }, indent=2))  # fmt: skip
        return 1 if failed else 0
    print(f"{count} schedules (seeds {first}..{first + count - 1}) in {elapsed:.1f} s: "
          f"{totals['virtual_s'] / 3600:.1f} virtual hours, {totals['requests']} Prefect requests "
          f"({totals['faults']} faulted), {totals['grants']} grants, "
          f"{totals['passed']} leases passed")  # fmt: skip
    print(
        f"orphan leases (an increment's answer lost): {totals['orphans']}; schedules where "
        f"a restart then forgot one (Prefect counts its slots for good): {totals['forgot']}"
    )
    print("schedules where a delayed request met what no client can tell apart: "
          + (", ".join(f"{k} {v}" for k, v in sorted(crossings.items())) or "none"))  # fmt: skip
    print("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    print("server events: " + ", ".join(f"{k} {v}" for k, v in sorted(events.items())))
    print(f"{'invariant':<18} {'schedules':>9}  first seeds")
    for invariant in invariants:
        seeds = failed.get(invariant, [])
        print(f"{invariant:<18} {len(seeds):>9}  {' '.join(map(str, seeds[:8]))}")
    if failed:
        worst = min(min(s) for s in failed.values())
        again = " --placement" if placement else ""
        print(f"replay: hack/simulate --seed {worst} --trace{again}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
