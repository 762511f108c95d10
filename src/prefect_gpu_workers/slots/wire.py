"""The slot broker's wire format: one JSON object per line on its Unix socket.

Standard library only; the broker (``broker.py``) and the step's side
(``client.py``) both speak it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

# Wire format: one JSON object per line, UTF-8, over a Unix stream socket.
# client -> broker: {"op": "acquire", "limit": NAME, "occupy": N, "holder": {...} | null,
#                    "memory_gib": G (optional: placed on one GPU, held in the memory limit),
#                    "also": {LIMIT: N, ...} (optional: other limits held with the grant),
#                    "labels": {"deployment": NAME, "deployment_id": UUID, "flow": NAME,
#                               "task": NAME} (optional, each key optional: who asks, for
#                               the broker's accounting; the broker resolves a
#                               deployment_id to its name)}
#                   {"op": "release"}
#                   {"op": "stats"}
# broker -> client: {"event": "granted", "lease_id": ID, "waited_s": S,
#                    "lease_ids": [ID, ...] (every lease of the grant, the slot's first),
#                    "gpu": {"position": P, "uuid": U, "memory_gib": G} (memory requests)}
#                   {"event": "released"}
#                   {"event": "error", "kind": KIND, "message": TEXT}
#   KIND: bad_request, limit_unusable, busy (connection cap), broker (its own
#   failure), or a Refusal's value (stranger, run_cap)
#                   {"event": "stats", ...}
# The connection's lifetime is the grant's: closing it (or dying) releases.
MAX_MESSAGE_BYTES = 4096
# Other limits one request may hold with its grant (``also``).
MAX_ALSO = 8
# The keys ``labels`` may carry, and the longest value each may be.
LABEL_KEYS = ("deployment", "deployment_id", "flow", "task")
MAX_LABEL_CHARS = 200


@dataclass(frozen=True)
class AcquireRequest:
    """An ``acquire`` message, checked field by field."""

    limit: str
    occupy: int
    holder: dict[str, Any] | None
    memory_gib: int | None = None
    also: tuple[tuple[str, int], ...] = ()  # sorted by name: the order they are taken in
    # Who asks (LABEL_KEYS): empty for a client that sends none.
    labels: dict[str, str] = field(default_factory=dict)


def parse_acquire(message: dict[str, Any]) -> AcquireRequest:
    """Check an ``acquire`` message; a bad field is a one-line error naming it.

    Raises:
        ValueError: ``limit`` is not a non-empty string, ``occupy`` or
            ``memory_gib`` not a whole number of at least 1 (``true``, ``1.5`` and
            ``null`` are refused, not rounded), ``holder`` neither an object nor
            null, or ``also`` not an object of at most :data:`MAX_ALSO` limit
            names to whole numbers, or naming ``limit`` itself, or ``labels``
            not an object of strings of at most :data:`MAX_LABEL_CHARS`
            characters under :data:`LABEL_KEYS` (``deployment_id`` a UUID).

    Example:
        >>> parse_acquire({"op": "acquire", "limit": "gpu:w", "occupy": 2}).occupy
        2
        >>> parse_acquire({"limit": "gpu:w", "occupy": True})
        Traceback (most recent call last):
        ...
        ValueError: occupy must be a whole number of slots >= 1, got true
        >>> parse_acquire({"limit": "gpu:w", "memory_gib": 20, "also": {"b": 1, "a": 2}}).also
        (('a', 2), ('b', 1))
        >>> parse_acquire({"limit": "gpu:w", "labels": {"flow": "f", "task": "t"}}).labels
        {'flow': 'f', 'task': 't'}
        >>> parse_acquire({"limit": "gpu:w", "labels": {"user": "x"}})
        Traceback (most recent call last):
        ...
        ValueError: labels.user is not a label (deployment, deployment_id, flow, task)
    """
    limit = message.get("limit")
    if not isinstance(limit, str) or not limit:
        raise ValueError(f"limit must be a limit's name, got {json.dumps(limit)}")
    occupy = _whole(message.get("occupy", 1), "occupy", "slots")
    holder = message.get("holder")
    if holder is not None and not isinstance(holder, dict):
        raise ValueError(f"holder must be an object or null, got {json.dumps(holder)}")
    memory = message.get("memory_gib")
    memory_gib = None if memory is None else _whole(memory, "memory_gib", "GiB")
    also = message.get("also") or {}
    if not isinstance(also, dict) or len(also) > MAX_ALSO:
        raise ValueError(f"also must be an object of at most {MAX_ALSO} limits to slots")
    for name, slots in also.items():
        if not name or name == limit:
            raise ValueError(f"also names {json.dumps(name)}: a limit other than {limit}")
        _whole(slots, f"also[{name}]", "slots")
    labels = _labels(message.get("labels"))
    return AcquireRequest(limit, occupy, holder, memory_gib, tuple(sorted(also.items())), labels)


def _labels(value: Any) -> dict[str, str]:
    """The ``labels`` field checked: absent or null is no labels."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"labels must be an object, got {json.dumps(value)}")
    for key, text in value.items():
        if key not in LABEL_KEYS:
            raise ValueError(f"labels.{key} is not a label ({', '.join(LABEL_KEYS)})")
        if not isinstance(text, str) or len(text) > MAX_LABEL_CHARS:
            raise ValueError(
                f"labels.{key} must be a string of at most {MAX_LABEL_CHARS} characters"
            )
    if value.get("deployment_id"):
        try:
            UUID(value["deployment_id"])
        except ValueError:
            raise ValueError("labels.deployment_id must be a UUID") from None
    return dict(value)


def _whole(value: Any, field: str, unit: str) -> int:
    """``value`` if it is a whole number >= 1 (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a whole number of {unit} >= 1, got {json.dumps(value)}")
    return value


def encode(message: dict[str, Any]) -> bytes:
    """One protocol message as a line of JSON."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one protocol line.

    Raises:
        ValueError: not a JSON object, or too long.
    """
    if len(line) > MAX_MESSAGE_BYTES:
        raise ValueError("message too long")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("message is not a JSON object")
    return message
