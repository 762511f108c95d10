"""The report and the timeline of ``demo`` and ``bench`` as Prefect artifacts.

Where they go: a flow run of their own (flow ``pgw-demo`` or ``pgw-bench``,
tagged ``pgw-report`` and ``pool:<pool>``), created Running, given the two
artifacts, then set Completed. Not on the batch's runs: the report is about
the batch, and copied onto each of N runs it would be N identical tables on N
run pages, with no one place to look. The GPU steps' own tables are on their
runs (``pgw_flows.artifacts``). The keys (``pgw-demo-report``,
``pgw-demo-timeline``, ``pgw-bench-...``) put each command's latest report on
the Artifacts page, its earlier ones in the key's history.

The run is made through the client rather than by running a flow here: a
flow run in the demo's own process would bring Prefect's engine (run logs
shipped to the API, its own signal handling) into the process that must stop
everything it started on Ctrl-C. The client's artifact events are sent before
publishing returns (within a bound), while the server is up. Publishing never
fails the command: an error is one line in yellow, and the command goes on.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from prefect_gpu_workers.records import Cell

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from rich.console import Console

Command = Literal["demo", "bench"]
REPORT_TAG = "pgw-report"
# How long publishing waits for the artifacts' events to be sent (see _wait_for_events_sent).
EVENTS_TIMEOUT_S = 10.0


def report_flow_name(command: Command) -> str:
    """The flow whose runs carry a command's reports (``pgw-demo``)."""
    return f"pgw-{command}"


def report_keys(command: Command) -> tuple[str, str]:
    """The artifact keys of a command's report table and timeline (lowercase, dashes).

    Example:
        >>> report_keys("bench")
        ('pgw-bench-report', 'pgw-bench-timeline')
    """
    return f"pgw-{command}-report", f"pgw-{command}-timeline"


def report_tags(pool: str) -> list[str]:
    """Tags of a report's run: findable among all reports, and by the pool that ran it."""
    return [REPORT_TAG, f"pool:{pool}"]


def table_json(rows: Sequence[dict[str, Cell]]) -> str:
    """Rows as Prefect stores a table artifact's data: a JSON string, NaN as null
    (what ``prefect.artifacts.create_table_artifact`` sends, and the UI reads).

    Example:
        >>> table_json([{"measure": "x", "demo": float("nan")}])
        '[{"measure": "x", "demo": null}]'
    """
    return json.dumps(
        [
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            for row in rows
        ]
    )


def report_run_name(command: Command, at: float) -> str:
    """``demo report 2025-01-31 12:00:05`` (local time): runs list sorted by it read well."""
    return f"{command} report {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))}"


@dataclass(frozen=True)
class Published:
    """Where a report went: its run, or why it went nowhere."""

    run_id: UUID | None = None
    run_name: str | None = None
    error: str | None = None

    def describe(self, command: Command) -> str:
        """One line for the console."""
        if self.error is not None:
            return f"artifacts: not published ({self.error}); the {command} goes on"
        table, timeline = report_keys(command)
        return (
            f"artifacts: {table} and {timeline} on flow run '{self.run_name}' ({self.run_id}); "
            "each GPU step's table on its own run (key gpu-step-<flow run id>)"
        )


def print_published(console: Console, published: Published | None, command: Command) -> None:
    """Say where the report went (``None``: artifacts were off), or why it went nowhere."""
    if published is None:
        console.print("artifacts: off (--no-artifacts)")
        return
    console.print(
        published.describe(command),
        style="yellow" if published.error else None,
        soft_wrap=True,  # a person copies the run's id
        highlight=False,
    )


def _report_flow(command: Command) -> Any:
    # A Flow object only for its name, version and retry policy, which
    # create_flow_run reads; it never runs.
    from prefect import flow

    def report() -> None:
        """Stands for a demo's or bench's report: its run carries the artifacts."""

    return flow(name=report_flow_name(command), log_prints=False)(report)


def publish_report(
    client: SyncPrefectClient,
    command: Command,
    pool: str,
    table: Sequence[dict[str, Cell]],
    markdown: str,
    description: str,
) -> Published:
    """Create the report's run and its two artifacts; a failure is returned, never raised.

    Args:
        client: a client of the server the runs ran on.
        command: ``demo`` or ``bench`` (names the flow and the keys).
        pool: the work pool the batch ran in (a tag of the run).
        table: the report's figures (:func:`report.figure_rows`).
        markdown: the timeline (:func:`local.timeline.timeline_markdown`).
        description: one line shown above both artifacts.
    """
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.states import Completed, Running

    name = report_run_name(command, time.time())
    table_key, timeline_key = report_keys(command)
    try:
        artifacts = ((table_key, "table", table_json(table)), (timeline_key, "markdown", markdown))
        run = client.create_flow_run(
            _report_flow(command), name=name, tags=report_tags(pool), state=Running()
        )
        for key, kind, data in artifacts:
            client.create_artifact(
                ArtifactCreate(
                    key=key, type=kind, description=description, data=data, flow_run_id=run.id
                )
            )
        client.set_flow_run_state(run.id, Completed(message=description), force=True)
        _wait_for_events_sent()
    except Exception as exc:  # any failure: the report is a courtesy, the batch is done
        return Published(error=f"{type(exc).__name__}: {exc}"[:300])
    return Published(run_id=run.id, run_name=name)


def _wait_for_events_sent(timeout_s: float = EVENTS_TIMEOUT_S) -> None:
    """Wait, within ``timeout_s``, until Prefect's events thread has sent the artifacts' events.

    The client emits an event per artifact from a thread of its own. Left
    queued, they are sent at this process's exit, when the local session has
    stopped its server, and Prefect says "Still processing items" on the way
    out. A queue that does not empty in time (a server too slow) is left to
    Prefect's own exit.
    """
    from prefect.events.worker import EventsWorker

    worker = EventsWorker.instance()
    waiter = threading.Thread(target=worker.wait_until_empty, name="pgw-events", daemon=True)
    waiter.start()
    waiter.join(timeout_s)
