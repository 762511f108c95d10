"""A GPU step in a process of its own: ``python slot_holder.py OCCUPY``.

Takes ``gpu_slot(OCCUPY)`` (WORKER_ID, PGW_SLOT_BROKER and PREFECT_API_URL from the
environment), prints ``held``, waits for a line on stdin, leaves the block and
prints ``released``. Killing it while it holds is the point of some tests.
"""

from __future__ import annotations

import sys

from prefect_gpu_workers.slots.client import gpu_slot


def main() -> None:
    occupy = int(sys.argv[1])
    with gpu_slot(occupy):
        print("held", flush=True)
        sys.stdin.readline()
    print("released", flush=True)


if __name__ == "__main__":
    main()
