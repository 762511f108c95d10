"""``prefect-gpu-workers start``: one long-running service per GPU machine, no cluster.

Pure decisions (``identity``, ``sizing``, ``plan``) are apart from the plumbing
(``processes``, ``prefect_ops``, ``run``) and the ``status`` view, so that the
decisions are tested without Prefect or processes.
"""
