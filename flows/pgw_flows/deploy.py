"""The pipeline's deployment for a process work pool.

The entrypoint is a module path (``pgw_flows.pipeline.gpu_pipeline``), not a
file path: the flow-run process imports it from the installed package, so it
works whatever directory the worker runs in (a process worker starts each flow
run in a fresh temporary directory) and needs no storage or pull step. The
price: the worker's Python environment must have this project installed,
which is true for the local mode and the worker image alike.

Usage: ``python -m pgw_flows.deploy --pool gpu-pool`` (PREFECT_API_URL set).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from prefect.deployments.runner import RunnerDeployment
from prefect.types.entrypoint import EntrypointType

from pgw_flows.pipeline import FLOW_NAME, gpu_pipeline

DEPLOYMENT_NAME = "gpu-pipeline"
ENTRYPOINT = "pgw_flows.pipeline.gpu_pipeline"


def deployment_ref(name: str = DEPLOYMENT_NAME) -> str:
    """``flow-name/deployment-name``, as ``prefect deployment run`` wants it."""
    return f"{FLOW_NAME}/{name}"


def deploy_pipeline(
    work_pool: str,
    name: str = DEPLOYMENT_NAME,
    parameters: Mapping[str, Any] | None = None,
    job_variables: Mapping[str, Any] | None = None,
) -> UUID:
    """Create or update the deployment; returns its id.

    ``to_deployment().apply()`` is what ``flow.deploy()`` does for a process
    pool without an image, minus the console tables it prints.
    """
    deployment = RunnerDeployment.from_flow(
        gpu_pipeline,
        name=name,
        work_pool_name=work_pool,
        parameters=dict(parameters or {}),
        job_variables=dict(job_variables or {}),
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    deployment_id = deployment.apply(work_pool_name=work_pool)
    # apply() dispatches on the caller: inside a running event loop it would
    # hand back a coroutine. This function is for synchronous callers only.
    if not isinstance(deployment_id, UUID):
        raise TypeError("deploy_pipeline() was called from async code; use RunnerDeployment.aapply")
    return deployment_id


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pool", required=True, help="process work pool (must exist)")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name")
    args = parser.parse_args(argv)
    deployment_id = deploy_pipeline(args.pool, args.name)
    print(f"deployed {deployment_ref(args.name)} ({deployment_id}) to pool {args.pool}")


if __name__ == "__main__":
    main()
