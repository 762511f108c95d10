"""The worker: what runs in every worker pod, under ``start`` and in local mode.

One process per worker (``prefect-gpu-workers worker``, :mod:`.entrypoint`)
hosts the slot broker (``prefect_gpu_workers.slots``, the layer below) and
Prefect's process worker. Beside it:

- :mod:`.launcher`: the warm launcher, a process that has imported Prefect
  and forks each flow run (``--launcher fork``), and :mod:`.starting`, the
  worker's side of it (Prefect's ``ProcessStarter`` seam, the fallbacks);
- :mod:`.drain`: what a stopping worker does with each run it claimed (pure);
- :mod:`.journal`: the runs in flight on disk, for the worker that comes next.

Nothing is imported here: the CLI and the launcher import only what they use.
"""
