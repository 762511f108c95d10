"""A transient Prefect API error while the worker submits a run never crashes the run.

Tried on plain ``prefect server`` (SQLite) with 20 runs at once, 2 ended Crashed:
"Failed to submit flow run to infrastructure: ... 503 ... /flow_runs/<id>/labels".
Here a :class:`~recording_server.FaultProxy` between the worker and a real server
answers 500 (which Prefect's client does not retry) to the first label writes:
the faults are on the wire, nothing in the worker is mocked.
"""

from __future__ import annotations

from collections.abc import Callable

from broker_harness import wait_until
from prefect.client.orchestration import get_client
from recording_server import FaultProxy, origin
from worker_harness import DrainingWorker, states

from prefect_gpu_workers.server import LocalPrefectServer
from prefect_gpu_workers.worker.entrypoint import SUBMIT_RETRY_S


def test_label_writes_that_fail_are_retried_then_the_run_is_scheduled_again_never_crashed(
    start_worker: Callable[..., DrainingWorker], prefect_server: LocalPrefectServer
) -> None:
    """Before: the first 500 crashed the run. Now the worker retries the write, and a
    run whose submission still fails goes back in the queue and runs on a later claim."""
    proxy = FaultProxy(upstream=origin(prefect_server.api_url))
    with proxy.running():
        worker = start_worker(drain_s=0, flow_runs=1, api_url=f"{proxy.url}/api")
        # One claim's tries all fail, and the first of the next claim's.
        failures = len(SUBMIT_RETRY_S) + 2
        proxy.fail_before_upstream("/labels", 500, times=failures)
        with get_client(sync_client=True) as client:
            run_id = worker.submit(client, gpu_s=0.5, env={})
            wait_until(
                lambda: states(client, [run_id])[run_id][0] in {"COMPLETED", "CRASHED", "FAILED"},
                "the run ended",
                240,
            )
            history = [state.type.value for state in client.read_flow_run_states(run_id)]
        assert proxy.faulted == failures
    assert history[-1:] == ["COMPLETED"], history
    assert "CRASHED" not in history, history
    assert "scheduled again" in worker.log()
    assert "trying again in" in worker.log()
