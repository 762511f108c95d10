"""Which worker id a ``start`` service uses, and why (pure, standard library only).

Order: ``--worker-id``, else ``WORKER_ID``, else the host name made valid. An id
the user typed (flag or variable) is validated as is: silently changing it
would name a limit the user's flows do not use. Only the host name, which the
user did not choose for this purpose, is rewritten (lowercase, invalid
characters to '-', trimmed to a DNS subdomain), and the result is said aloud.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from prefect_gpu_workers.naming import (
    MAX_WORKER_ID,
    WORKER_ID_ENV,
    WorkerIdentityError,
    validate_worker_id,
)

# Room kept for the per-GPU suffix (``-gpu12-mig6``) when the id comes from a host name.
PER_GPU_SUFFIX_ROOM = 16


@dataclass(frozen=True)
class WorkerIdChoice:
    worker_id: str
    source: str  # "--worker-id", "WORKER_ID" or "host name"
    message: str


def worker_id_from_host_name(host_name: str, room: int = 0) -> str:
    """Make ``host_name`` a valid worker id: a DNS subdomain of at most 253 - ``room`` characters.

    Raises:
        WorkerIdentityError: nothing usable is left (e.g. a host name of only symbols).

    Example:
        >>> worker_id_from_host_name("GPU_Box_1.Lab")
        'gpu-box-1.lab'
    """
    text = re.sub(r"[^a-z0-9.-]", "-", host_name.strip().lower())
    text = _tidy(text)[: MAX_WORKER_ID - room]
    text = _tidy(text)  # trimming can leave a '-' or '.' at the end
    if not text:
        raise WorkerIdentityError(
            f"host name {host_name!r} leaves no valid worker id; pass --worker-id or set "
            f"{WORKER_ID_ENV}"
        )
    return validate_worker_id(text)


def _tidy(text: str) -> str:
    # Each dot-separated label must start and end with a letter or digit.
    labels = (label.strip("-") for label in text.split("."))
    return ".".join(label for label in labels if label)


def resolve_worker_id(
    flag: str | None,
    env: Mapping[str, str],
    host_name: str,
    room: int = 0,
) -> WorkerIdChoice:
    """The service's worker id: ``--worker-id``, else ``WORKER_ID``, else the host name.

    Args:
        flag: the ``--worker-id`` value, if given.
        env: the environment (``WORKER_ID``).
        host_name: ``socket.gethostname()``.
        room: characters to keep free for suffixes (``--per-gpu`` names).

    Raises:
        WorkerIdentityError: a flag or variable that is not a valid worker id.
    """
    if flag:
        return WorkerIdChoice(_checked(flag, "--worker-id", room), "--worker-id",
                              f"worker id {flag!r} (from --worker-id)")  # fmt: skip
    value = env.get(WORKER_ID_ENV)
    if value:
        return WorkerIdChoice(_checked(value, WORKER_ID_ENV, room), WORKER_ID_ENV,
                              f"worker id {value!r} (from {WORKER_ID_ENV})")  # fmt: skip
    worker_id = worker_id_from_host_name(host_name, room)
    how = "" if worker_id == host_name else f", made a valid DNS subdomain from {host_name!r}"
    return WorkerIdChoice(
        worker_id,
        "host name",
        f"worker id {worker_id!r} (from the host name{how}); "
        f"set --worker-id or {WORKER_ID_ENV} to choose another",
    )


def _checked(value: str, where: str, room: int) -> str:
    try:
        validate_worker_id(value)
    except WorkerIdentityError as exc:
        raise WorkerIdentityError(f"{where}: {exc}") from None
    if len(value) > MAX_WORKER_ID - room:
        raise WorkerIdentityError(
            f"{where}: {value!r} leaves no room for the per-GPU suffix "
            f"(at most {MAX_WORKER_ID - room} characters with --per-gpu)"
        )
    return value
