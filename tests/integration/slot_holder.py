"""A GPU step in a process of its own: ``python slot_holder.py OCCUPY [MEMORY] [ALSO_JSON]``.

Takes ``gpu_slot(OCCUPY, memory=MEMORY, also=ALSO)`` (WORKER_ID, PGW_SLOT_BROKER
and PREFECT_API_URL from the environment), prints ``held <device>``, waits for
a line on stdin, leaves the block and prints ``released``. Killing it while it
holds is the point of some tests.
"""

from __future__ import annotations

import json
import sys

from prefect_gpu_workers.slots.client import gpu_slot


def main() -> None:
    occupy = int(sys.argv[1])
    memory = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
    also = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    with gpu_slot(occupy, memory=memory, also=also) as grant:
        print(f"held {grant.device}", flush=True)
        sys.stdin.readline()
    print("released", flush=True)


if __name__ == "__main__":
    main()
