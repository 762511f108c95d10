"""``python -m prefect_gpu_workers``: the CLI, as the ``prefect-gpu-workers`` script runs it.

Local mode starts its workers this way, through its own interpreter, so that
they run the entrypoint pods run without needing the script on ``PATH``.
"""

from prefect_gpu_workers.cli import main

if __name__ == "__main__":
    main()
