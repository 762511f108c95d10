"""Local mode: a Prefect server, process workers and their limits on this machine.

A layer above the core and the flows (it deploys ``pgw_flows``); nothing in
the core imports it. By concern:

- ``plan``: pure decisions (capacity, worker plans, flow runs per worker);
- ``processes``: start processes logged, find and stop them by a marker;
- ``prefect_ops``: Prefect calls (pool, limits, deployment, runs);
- ``session``: one server, the workers, and the cleanup of everything started;
- ``batch``: one batch submitted, waited for and measured;
- ``demo``, ``bench``, ``views``: the two commands and what they show.
"""
