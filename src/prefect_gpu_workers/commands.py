"""The worker's command lines, built in one place, with the standard library only.

A worker runs the entrypoint ``prefect-gpu-workers worker --pool P --flow-runs N
--limit-prefix X --wait-timeout S``: the operator puts it in every worker pod
(``desired.worker_command``) and local mode starts its workers with it, through
this interpreter. The entrypoint waits for its limit and then runs, in one
process, the worker's slot broker and the Prefect process worker.

The operator imports this module, so it must not import Prefect.

Example:
    >>> command = worker_command("p", flow_runs=10, limit_prefix="gpu", wait_timeout_s=300)
    >>> " ".join(command)
    'prefect-gpu-workers worker --pool p --flow-runs 10 --limit-prefix gpu --wait-timeout 300'
"""

from __future__ import annotations

from collections.abc import Sequence

# The console script (pyproject's [project.scripts]) that worker images run.
CONSOLE_SCRIPT = "prefect-gpu-workers"
WORKER_SUBCOMMAND = "worker"
# Seconds the worker keeps between its drain deadline and the kill that ends
# the pod's grace period: stopping the rest, setting their states, the slots.
DRAIN_MARGIN_S = 15
# How the worker starts its flow runs' processes (``--launcher``): forked from
# a warm launcher that has imported Prefect, or a new interpreter each.
LAUNCHERS = ("fork", "subprocess")
DEFAULT_LAUNCHER = "fork"
# The TCP ports ``--metrics-port`` accepts.
MIN_PORT, MAX_PORT = 1, 65535


def module_program(python: str) -> list[str]:
    """The entrypoint through an interpreter (``python -m prefect_gpu_workers``).

    Local mode uses it with ``sys.executable``: its workers then run the
    project this interpreter has installed, whatever is on ``PATH``.
    """
    return [python, "-m", "prefect_gpu_workers"]


def drain_seconds_within(grace_period_s: float) -> int:
    """The worker's drain deadline inside a grace period that ends in a kill.

    Example:
        >>> drain_seconds_within(60), drain_seconds_within(10)
        (45, 0)
    """
    return max(0, int(grace_period_s) - DRAIN_MARGIN_S)


def worker_command(
    pool: str,
    flow_runs: int,
    limit_prefix: str,
    wait_timeout_s: float,
    with_healthcheck: bool = False,
    program: Sequence[str] = (CONSOLE_SCRIPT,),
    slot_broker: bool = True,
    drain_s: float | None = None,
    launcher: str = DEFAULT_LAUNCHER,
    preload: Sequence[str] = (),
    gpus: int | None = None,
    gpu_memory: str | None = None,
    metrics_port: int | None = None,
    metrics_socket: str | None = None,
) -> list[str]:
    """The worker entrypoint's command line.

    Args:
        pool: the process work pool the worker serves.
        flow_runs: flow runs the worker takes at once (Prefect's ``--limit``).
        limit_prefix: the part of the limit name before the colon.
        wait_timeout_s: how long the entrypoint waits for the limit before failing.
        with_healthcheck: serve the Prefect worker's ``/health`` (pods' probes).
        program: how to start the entrypoint: the console script (images) or
            :func:`module_program` (local mode).
        slot_broker: False starts the worker without its slot broker, so that its
            GPU steps poll Prefect (benchmarks compare the two).
        drain_s: seconds its flow runs in flight get to finish when it is told to
            stop (``--drain-seconds``); None keeps the entrypoint's default.
        launcher: how flow runs start (``--launcher``, :data:`LAUNCHERS`).
        preload: modules the warm launcher imports first (``--preload``); none
            given keeps the entrypoint's defaults.
        gpus: the worker's GPUs (``--gpus``) where NVML cannot count them.
        gpu_memory: each GPU's memory (``--gpu-memory``, "80GiB") where NVML
            cannot read it; the broker places memory requests on it.
        metrics_port: serve the worker's Prometheus metrics over HTTP on
            0.0.0.0 at this TCP port (``--metrics-port``); None serves none.
        metrics_socket: serve the same text on this Unix socket
            (``--metrics-socket``, mode 0600: nothing on TCP); None serves none.

    Raises:
        ValueError: ``flow_runs`` below 1, a negative ``wait_timeout_s``, an
            unknown ``launcher`` or a ``metrics_port`` outside 1..65535.

    Example:
        >>> worker_command("p", 1, "gpu", 60, metrics_port=9400)[-2:]
        ['--metrics-port', '9400']
    """
    if flow_runs < 1:
        raise ValueError(f"flow_runs must be at least 1, got {flow_runs}")
    if wait_timeout_s < 0:
        raise ValueError(f"wait_timeout_s must not be negative, got {wait_timeout_s}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if metrics_port is not None:
        validate_metrics_port(metrics_port)
    command = [
        *program, WORKER_SUBCOMMAND,
        "--pool", pool,
        "--flow-runs", str(flow_runs),
        "--limit-prefix", limit_prefix,
        "--wait-timeout", str(wait_timeout_s),
    ]  # fmt: skip
    if with_healthcheck:
        command.append("--with-healthcheck")
    if not slot_broker:
        command.append("--no-slot-broker")
    if drain_s is not None:
        command += ["--drain-seconds", f"{drain_s:g}"]
    if launcher != DEFAULT_LAUNCHER:
        command += ["--launcher", launcher]
    for module in preload:
        command += ["--preload", module]
    if gpus is not None:
        command += ["--gpus", str(gpus)]
    if gpu_memory is not None:
        command += ["--gpu-memory", gpu_memory]
    if metrics_port is not None:
        command += ["--metrics-port", str(metrics_port)]
    if metrics_socket is not None:
        command += ["--metrics-socket", metrics_socket]
    return command


def validate_metrics_port(port: int) -> int:
    """A TCP port the worker may serve its metrics on (1..65535; 0 would pick one at random).

    Raises:
        ValueError: the port is outside 1..65535.

    Example:
        >>> validate_metrics_port(9400)
        9400
    """
    if not MIN_PORT <= port <= MAX_PORT:
        raise ValueError(f"metrics port must be in {MIN_PORT}..{MAX_PORT}, got {port}")
    return port
