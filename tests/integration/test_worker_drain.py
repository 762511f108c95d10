"""The worker entrypoint drains on SIGTERM (what the kubelet, ``start`` and Ctrl-C send):
it takes no new flow runs, lets those in flight finish within its drain, and stops the
rest in a state Prefect acts on, never Running, with their GPU slots given back."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

from broker_harness import active_slots, wait_until
from prefect.client.orchestration import get_client
from prefect.states import Cancelled, Running
from worker_harness import DrainingWorker, metric_sample, states

from prefect_gpu_workers.naming import FLOW_RUN_ID_ENV, WORKER_ID_ENV
from prefect_gpu_workers.procfs import pids_with_env
from prefect_gpu_workers.server import LocalPrefectServer
from prefect_gpu_workers.worker.drain import SIGTERM_BEHAVIOR_ENV, WORKER_NAME_LABEL


def test_sigterm_lets_the_runs_in_flight_finish_and_takes_no_more(
    start_worker: Callable[..., DrainingWorker],
) -> None:
    worker = start_worker(drain_s=300)
    with get_client(sync_client=True) as client:
        # Long enough that both are surely running at once, however slowly each starts.
        first = [worker.submit(client, gpu_s=20.0, env={}) for _ in range(2)]
        wait_until(
            lambda: (
                all(s[0] == "RUNNING" for s in states(client, first).values())
                and len(states(client, first)) == 2
            ),
            "both runs are running",
            300,
        )
        # Both in their GPU step (20 s each), so the drain waits on GPU time.
        wait_until(
            lambda: metric_sample(worker.metrics(), "pgw_gpu_slots_held") == 2,
            "both runs hold their slots at the broker",
            120,
        )
        assert metric_sample(worker.metrics(), "pgw_worker_draining") == 0
        signalled = time.time()
        worker.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining" in worker.log(), "the worker starts draining", 30)
        late = worker.submit(client, gpu_s=1.0, env={})
        # What the drain alert reads, and the GPU time of the runs it waits for.
        text = worker.metrics()
        assert metric_sample(text, "pgw_worker_draining") == 1
        began = metric_sample(text, "pgw_worker_drain_started_timestamp_seconds")
        assert began is not None
        assert signalled - 1 <= began <= time.time()
        assert metric_sample(text, "pgw_worker_drain_grace_seconds") == 300
        held = metric_sample(
            text, "pgw_gpu_step_held_slot_seconds_total", deployment=f"pipeline-{worker.worker}"
        )
        assert held is not None
        assert held > 0, text
        assert worker.proc.wait(timeout=300) == 0, worker.log()[-3000:]
        after = states(client, [*first, late])
    assert [after[run_id][0] for run_id in first] == ["COMPLETED", "COMPLETED"]
    assert after[late][0] == "SCHEDULED", "a draining worker took a new flow run"
    assert "drained in" in worker.log()
    assert "2 finished" in worker.log()
    assert active_slots(worker.limit) == 0


def test_runs_that_outlast_the_drain_are_rescheduled_or_crashed_with_their_slots_back(
    start_worker: Callable[..., DrainingWorker],
) -> None:
    worker = start_worker(drain_s=1)
    with get_client(sync_client=True) as client:
        rescheduled = worker.submit(client, gpu_s=120.0, env={SIGTERM_BEHAVIOR_ENV: "reschedule"})
        crashed = worker.submit(client, gpu_s=120.0, env={})
        # Both hold their GPU slot: the drain must stop them mid-step.
        wait_until(lambda: active_slots(worker.limit) == 2, "both GPU steps hold a slot", 300)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=60) == 0, worker.log()[-3000:]
        after = states(client, [rescheduled, crashed])
    assert after[rescheduled][:2] == ("SCHEDULED", "Rescheduled"), after[rescheduled]
    assert after[crashed][0] == "CRASHED", after[crashed]
    assert "did not finish within its 1 s drain" in after[crashed][2]
    assert "1 rescheduled" in worker.log()
    assert "1 crashed" in worker.log()
    # The slots came back with the runs, not minutes later when their leases expire.
    assert active_slots(worker.limit) == 0
    for run_id in (rescheduled, crashed):
        assert pids_with_env(FLOW_RUN_ID_ENV, str(run_id)) == [], "a flow-run process survived"


def test_a_drain_with_prefect_away_stops_the_runs_and_the_next_worker_settles_them(
    start_worker: Callable[..., DrainingWorker], prefect_server: LocalPrefectServer
) -> None:
    """Before: the run left the journal when its process was stopped, so nothing ever
    ended it after a drain that could not reach Prefect (it stayed Running)."""
    worker = start_worker(drain_s=1)
    with get_client(sync_client=True) as client:
        run_id = worker.submit(client, gpu_s=120.0, env={})
        wait_until(lambda: active_slots(worker.limit) == 1, "the GPU step holds its slot", 300)
    server_pid = prefect_server.pid
    assert server_pid is not None
    os.kill(server_pid, signal.SIGSTOP)  # the API stops answering, connections hang
    try:
        worker.proc.send_signal(signal.SIGTERM)
        # Each call to Prefect gives up after 5 s: the drain ends well inside a grace period.
        assert worker.proc.wait(timeout=60) == 0, worker.log()[-3000:]
    finally:
        os.kill(server_pid, signal.SIGCONT)
    log = worker.log()
    assert "draining without the Prefect API" in log
    assert "1 not set (Prefect unreachable)" in log
    assert pids_with_env(FLOW_RUN_ID_ENV, str(run_id)) == [], "a flow-run process survived"
    with get_client(sync_client=True) as client:
        assert states(client, [run_id])[run_id][0] == "RUNNING"
        start_worker(drain_s=0, like=worker)
        wait_until(
            lambda: states(client, [run_id])[run_id][0] == "CRASHED",
            "the next worker of the name settled the run",
            60,
        )
        assert "ended without settling" in states(client, [run_id])[run_id][2]


def test_a_killed_worker_s_runs_are_settled_by_the_next_worker_of_its_name(
    start_worker: Callable[..., DrainingWorker],
) -> None:
    first = start_worker(drain_s=0)
    with get_client(sync_client=True) as client:
        orphan = first.submit(client, gpu_s=120.0, env={})  # its process dies too
        cut_off = first.submit(client, gpu_s=120.0, env={})  # its process lives on
        wait_until(lambda: active_slots(first.limit) == 2, "both GPU steps hold a slot", 300)
        # What the OOM killer or a container restart does: no drain, no goodbye.
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
        for pid in pids_with_env(FLOW_RUN_ID_ENV, str(orphan)):
            os.kill(pid, signal.SIGKILL)
        assert pids_with_env(FLOW_RUN_ID_ENV, str(cut_off)), "its process should live on"
        assert {s[0] for s in states(client, [orphan, cut_off]).values()} == {"RUNNING"}

        second = start_worker(drain_s=0, like=first)
        wait_until(
            lambda: {s[0] for s in states(client, [orphan, cut_off]).values()} == {"CRASHED"},
            "both runs settled",
            60,
        )
        after = states(client, [orphan, cut_off])
    assert "ended without settling" in after[orphan][2], after
    # The cut-off run may end itself before the next worker starts (seen once: its
    # own Crashed, "Execution was aborted by Python system exit call"; cause not
    # found): either way it ends Crashed and its process is gone.
    assert "settled the flow runs an earlier" in second.log()
    assert "2 crashed" in second.log() or "ended without settling" not in after[cut_off][2]
    assert pids_with_env(FLOW_RUN_ID_ENV, str(cut_off)) == [], "a flow-run process survived"


def test_a_run_claimed_by_another_worker_since_is_left_alone_by_the_next_worker(
    start_worker: Callable[..., DrainingWorker],
) -> None:
    """Before: the next worker of the name force-set it Crashed and, on a shared host,
    killed every process of that run id, the other worker's included."""
    first = start_worker(drain_s=0, flow_runs=1)
    with get_client(sync_client=True) as client:
        moved = first.submit(client, gpu_s=120.0, env={})
        wait_until(lambda: active_slots(first.limit) == 1, "the GPU step holds a slot", 300)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
        for pid in pids_with_env(FLOW_RUN_ID_ENV, str(moved)):
            os.kill(pid, signal.SIGKILL)
        # What another worker that claimed the run again leaves: its label, a new
        # Running state, and the run's process under its own name on this host.
        other = f"{first.worker}-other"
        client.update_flow_run_labels(moved, {WORKER_NAME_LABEL: other})
        client.set_flow_run_state(moved, Running(), force=True)
        decoy = subprocess.Popen(
            ["sleep", "300"], env={FLOW_RUN_ID_ENV: str(moved), WORKER_ID_ENV: other}
        )
        try:
            second = start_worker(drain_s=0, like=first)
            wait_until(
                lambda: "settled the flow runs an earlier" in second.log(),
                "the next worker looked at the run",
                60,
            )
            assert states(client, [moved])[moved][0] == "RUNNING"
            assert decoy.poll() is None, "the other worker's flow-run process was killed"
            assert "1 claimed by another worker since (left alone)" in second.log()
        finally:
            decoy.kill()
            decoy.wait()
            client.set_flow_run_state(moved, Cancelled(), force=True)
