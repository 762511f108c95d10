"""Generate the Grafana dashboard of prefect-gpu-workers with grafana-foundation-sdk.

The chart ships the result, charts/prefect-gpu-workers/files/dashboard.json, in
a ConfigMap for Grafana's dashboard sidecar (``monitoring.dashboard.enabled``).
Edit this file, never the JSON, then regenerate::

    .venv/bin/python deploy/monitoring/dashboard.py           # rewrite the JSON
    .venv/bin/python deploy/monitoring/dashboard.py --check   # exit 1 if it is stale

Rows: pools (from the operator's series), workers (each worker pod's broker,
scraped by the chart's PodMonitor, which labels them with ``pool``), GPU time
by deployment (the broker's per-step accounting) and the operator itself.
Variables: the Prometheus data source, namespace, pool, deployment. Every
metric a query names must be one the project exports: deploy/monitoring/metric_names.py
checks it (hack/check-monitoring, tests/unit/test_monitoring.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUT = REPO_ROOT / "charts" / "prefect-gpu-workers" / "files" / "dashboard.json"
UID = "prefect-gpu-workers"

# Every query reads the data source the variable names, so one dashboard serves
# any Prometheus the sidecar's Grafana has.
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Pool series (the operator's) carry the pool's namespace; worker series carry
# the pod's namespace and, through the PodMonitor, the pool.
POOL_SEL = 'namespace=~"$namespace", pool=~"$pool"'
STEP_SEL = f'{POOL_SEL}, deployment=~"$deployment"'
QUANTILES = (0.5, 0.9, 0.99)


def sel(metric: str) -> str:
    """``metric`` with the namespace and pool the variables select."""
    return f"{metric}{{{POOL_SEL}}}"


def rate(metric: str) -> str:
    """Per-second rate of a counter of the selected namespaces and pools."""
    return f"rate({sel(metric)}[$__rate_interval])"


def query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref)
        .range()
        .datasource(DATASOURCE)
    )


def graph(
    title: str,
    description: str,
    targets: list[tuple[str, str]],
    *,
    unit: str = "short",
    width: int = 8,
    stack: bool = False,
) -> timeseries.Panel:
    """A time series panel of ``targets`` ((expr, legend), refs A, B, ...)."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .span(width)
        .height(8)
        .fill_opacity(10 if not stack else 40)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    if stack:
        panel = panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(query(expr, legend, chr(ord("A") + i)))
    return panel


def quantiles(histogram: str, selector: str, by: str = "") -> list[tuple[str, str]]:
    """p50/p90/p99 of a histogram's ``_bucket`` series over the rate interval."""
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) "
            f"(rate({histogram}_bucket{{{selector}}}[$__rate_interval])))",
            f"{prefix}p{round(q * 100)}",
        )
        for q in QUANTILES
    ]


def degraded_stat() -> stat.Panel:
    return (
        stat.Panel()
        .title("Degraded pools")
        .description(
            "Pools whose Degraded condition is True now (pgw_pool_degraded). "
            "Alert PgwPoolDegraded fires after 15 minutes."
        )
        .datasource(DATASOURCE)
        .span(6)
        .height(8)
        .thresholds(
            dash.ThresholdsConfig()
            .mode(model.ThresholdsMode.ABSOLUTE)
            .steps([model.Threshold(None, "green"), model.Threshold(1, "red")])
        )
        .with_target(
            query(
                f"sum(max by (namespace, pool) ({sel('pgw_pool_degraded')})) or vector(0)",
                "degraded",
                "A",
            ).instant()
        )
    )


def pool_panels() -> list[timeseries.Panel | stat.Panel]:
    # The leader and a standby may both export a pool's gauges: max, not sum.
    by = "max by (namespace, pool)"
    return [
        graph(
            "GPU slots in use vs slots",
            "Slots of the pool's worker limits held at the operator's last pass "
            "(Prefect's active_slots) against the slots its workers' limits have.",
            [
                (
                    f"{by} ({sel('pgw_pool_gpu_slots_in_use')})",
                    "{{namespace}}/{{pool}} in use",
                ),
                (f"{by} ({sel('pgw_pool_gpu_slots')})", "{{namespace}}/{{pool}} slots"),
            ],
            width=9,
        ),
        graph(
            "Workers ready vs desired",
            "Worker pods ready with their limit against spec.replicas: a gap that "
            "stays is pods that cannot start or get no limit.",
            [
                (f"{by} ({sel('pgw_pool_workers_ready')})", "{{namespace}}/{{pool}} ready"),
                (
                    f"{by} ({sel('pgw_pool_workers_desired')})",
                    "{{namespace}}/{{pool}} desired",
                ),
            ],
            width=9,
        ),
        degraded_stat(),
        graph(
            "Backlog by state",
            "Flow runs of the pool's work pool: scheduled (due, Late included) and "
            "pending need a worker; running have one. What an autoscaler scales on.",
            [
                (
                    f"max by (namespace, pool, state) ({sel('pgw_pool_backlog_runs')})",
                    "{{namespace}}/{{pool}} {{state}}",
                )
            ],
            width=12,
            stack=True,
        ),
        graph(
            "Limit changes in Prefect",
            "Limits the operator created, resized or deleted as workers came and went.",
            [
                (
                    "sum by (action) "
                    f"(increase({sel('pgw_limit_actions_total')}[$__rate_interval]))",
                    "{{action}}",
                )
            ],
            width=12,
        ),
    ]


def worker_panels() -> list[timeseries.Panel | stat.Panel]:
    return [
        graph(
            "Slots held vs limit, per worker",
            "Slots the worker's broker holds for live steps, its limit's size, and "
            "Prefect's active_slots of the limit: active above held for minutes "
            "is a leak (alert PgwGpuSlotLeaked).",
            [
                (f"sum by (pod) ({sel('pgw_gpu_slots_held')})", "{{pod}} held"),
                (f"sum by (pod) ({sel('pgw_gpu_slots')})", "{{pod}} limit"),
                (f"sum by (pod) ({sel('pgw_gpu_slots_active')})", "{{pod}} active in Prefect"),
            ],
        ),
        graph(
            "Steps waiting for a slot",
            "GPU steps waiting at each worker's broker.",
            [(f"sum by (pod) ({sel('pgw_gpu_slot_waiters')})", "{{pod}}")],
        ),
        graph(
            "Draining workers",
            "1 while a worker drains: it takes no new flow runs and waits for its "
            "running ones (alert PgwWorkerDrainOverdue past its grace).",
            [(f"max by (pod) ({sel('pgw_worker_draining')})", "{{pod}}")],
        ),
        graph(
            "Wait for a slot (quantiles)",
            "From a step's ask to its Prefect lease, all workers of the selection.",
            quantiles("pgw_gpu_slot_wait_seconds", POOL_SEL),
            unit="s",
        ),
        graph(
            "Handoff between steps (quantiles)",
            "From a holder letting go while others waited to the next lease taken.",
            quantiles("pgw_gpu_slot_handoff_seconds", POOL_SEL),
            unit="s",
        ),
        graph(
            "Grants, reclaims, repaired leases",
            "Slots granted, holders that died or left holding, and lost Prefect "
            "leases the broker repaired, per minute.",
            [
                (
                    f"sum ({rate('pgw_gpu_slot_grants_total')}) * 60",
                    "granted",
                ),
                (
                    f"sum ({rate('pgw_gpu_slot_reclaimed_total')}) * 60",
                    "reclaimed",
                ),
                (
                    f"sum ({rate('pgw_gpu_slot_lost_leases_repaired_total')}) * 60",
                    "leases repaired",
                ),
            ],
        ),
        graph(
            "GPU utilisation (NVML)",
            "Each GPU's utilisation as NVML reports it (workers with NVML only).",
            [
                (
                    f"max by (pod, gpu) ({sel('pgw_gpu_utilization_ratio')})",
                    "{{pod}} GPU {{gpu}}",
                )
            ],
            unit="percentunit",
            width=12,
        ),
        graph(
            "GPU memory used (NVML)",
            "Memory used on each GPU against its total (workers with NVML only).",
            [
                (
                    f"max by (pod, gpu) ({sel('pgw_gpu_memory_used_bytes')})",
                    "{{pod}} GPU {{gpu}} used",
                ),
                (
                    f"max by (pod, gpu) ({sel('pgw_gpu_memory_total_bytes')})",
                    "{{pod}} GPU {{gpu}} total",
                ),
            ],
            unit="bytes",
            width=12,
        ),
    ]


def rate_by_deployment(metric: str) -> str:
    return f"sum by (deployment) (rate({metric}{{{STEP_SEL}}}[$__rate_interval]))"


def deployment_panels() -> list[timeseries.Panel | stat.Panel]:
    held = rate_by_deployment("pgw_gpu_step_held_slot_seconds_total")
    busy = rate_by_deployment("pgw_gpu_step_busy_slot_seconds_total")
    memory = rate_by_deployment("pgw_gpu_step_memory_byte_seconds_total")
    return [
        graph(
            "GPU slots held, by deployment",
            "Slot-seconds held per second: the slots a deployment's steps hold on "
            "average (steps still holding count up to now).",
            [(held, "{{deployment}}")],
            width=12,
            stack=True,
        ),
        graph(
            "GPU slots busy, by deployment (NVML)",
            "Held slot-seconds weighted by the held GPUs' utilisation: the slots "
            "a deployment keeps busy (workers with NVML only).",
            [(busy, "{{deployment}}")],
            width=12,
            stack=True,
        ),
        graph(
            "Held but idle, by deployment (NVML)",
            "Slots held minus slots busy: held by a step doing CPU work, I/O or "
            "waiting. Only where busy series exist (NVML).",
            [(f"{held} - {busy}", "{{deployment}}")],
            width=12,
            stack=True,
        ),
        graph(
            "Idle share of held time, by deployment (NVML)",
            "1 - busy / held: alert PgwGpuHeldButIdle fires above 0.5 over 30 minutes.",
            [(f"1 - ({busy} / {held})", "{{deployment}}")],
            unit="percentunit",
            width=12,
        ),
        graph(
            "Steps started per minute, by deployment",
            "GPU steps granted their slots.",
            [(f"{rate_by_deployment('pgw_gpu_steps_total')} * 60", "{{deployment}}")],
        ),
        graph(
            "Time waited for slots, by deployment",
            "Seconds steps waited per second: how many steps wait on average.",
            [(rate_by_deployment("pgw_gpu_step_waited_seconds_total"), "{{deployment}}")],
        ),
        graph(
            "GPU memory while held, by deployment (NVML)",
            "Memory byte-seconds over held slot-seconds: the average memory a "
            "deployment's steps use on their GPUs while they hold them.",
            [
                (
                    f"{memory} / {held}",
                    "{{deployment}}",
                )
            ],
            unit="bytes",
        ),
    ]


def operator_panels() -> list[timeseries.Panel | stat.Panel]:
    return [
        graph(
            "Reconcile errors",
            "Failed reconcile passes per minute by reason (alert "
            "PgwReconcileErrorsRising when they go on).",
            [
                (
                    'sum by (reason) (rate(pgw_reconcile_errors_total{namespace=~"$namespace", '
                    'pool=~"$pool"}[$__rate_interval])) * 60',
                    "{{reason}}",
                )
            ],
            width=6,
        ),
        graph(
            "Reconcile duration (quantiles)",
            "Duration of one reconcile pass.",
            quantiles("pgw_reconcile_duration_seconds", POOL_SEL),
            unit="s",
            width=6,
        ),
        graph(
            "Leader",
            "1 for the operator process that holds the leader-election Lease; a standby shows 0.",
            [("max by (pod) (pgw_operator_leader)", "{{pod}}")],
            width=4,
        ),
        graph(
            "Kubernetes API requests",
            "Requests per second the reconciler makes, by verb.",
            [
                (
                    "sum by (verb) "
                    "(rate(pgw_operator_kubernetes_requests_total[$__rate_interval]))",
                    "{{verb}}",
                )
            ],
            unit="reqps",
            width=4,
        ),
        graph(
            "Prefect API requests",
            "Requests per second to Prefect, by method.",
            [
                (
                    "sum by (method) (rate(pgw_operator_prefect_requests_total[$__rate_interval]))",
                    "{{method}}",
                )
            ],
            unit="reqps",
            width=4,
        ),
    ]


def label_variable(name: str, label: str, query_expr: str) -> dash.QueryVariable:
    return (
        dash.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query_expr)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def build() -> dash.Dashboard:
    """The dashboard, as grafana-foundation-sdk's builder."""
    board = (
        dash.Dashboard("Prefect GPU workers")
        .uid(UID)
        .description(
            "GPU worker pools (prefect-gpu-workers): slots held against limits, "
            "waits, GPU time held and busy by deployment, and the operator."
        )
        .tags(["prefect", "gpu", "prefect-gpu-workers"])
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dash.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            label_variable(
                "namespace", "Namespace", "label_values(pgw_pool_workers_desired, namespace)"
            )
        )
        .with_variable(
            label_variable(
                "pool",
                "Pool",
                'label_values(pgw_pool_workers_desired{namespace=~"$namespace"}, pool)',
            )
        )
        .with_variable(
            label_variable(
                "deployment",
                "Deployment",
                f"label_values(pgw_gpu_steps_total{{{POOL_SEL}}}, deployment)",
            )
        )
    )
    rows = (
        ("Pools", pool_panels()),
        ("Workers", worker_panels()),
        ("GPU time by deployment", deployment_panels()),
        ("Operator", operator_panels()),
    )
    # Grafana keys panel state (links, edits) by id: unique and stable.
    next_id = 1
    for title, panels in rows:
        board = board.with_row(dash.Row(title).id(next_id))
        next_id += 1
        for panel in panels:
            board = board.with_panel(panel.id(next_id))
            next_id += 1
    return board


def render() -> str:
    """The dashboard's JSON, as the chart ships it (stable: keys sorted)."""
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    """Write the dashboard, or with ``--check`` exit 1 when the file differs."""
    text = render()
    if argv == ["--check"]:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(
                f"{OUTPUT.relative_to(REPO_ROOT)} is stale: run "
                ".venv/bin/python deploy/monitoring/dashboard.py",
                file=sys.stderr,
            )
            return 1
        print(f"{OUTPUT.relative_to(REPO_ROOT)} is current", file=sys.stderr)
        return 0
    if argv:
        print("usage: dashboard.py [--check]", file=sys.stderr)
        return 2
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
