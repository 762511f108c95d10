"""The slot broker's wire format: one JSON object per line on its Unix socket.

Standard library only; the broker (``broker.py``) and the step's side
(``client.py``) both speak it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Wire format: one JSON object per line, UTF-8, over a Unix stream socket.
# client -> broker: {"op": "acquire", "limit": NAME, "occupy": N, "holder": {...} | null}
#                   {"op": "release"}
#                   {"op": "stats"}
# broker -> client: {"event": "granted", "lease_id": ID, "waited_s": S}
#                   {"event": "released"}
#                   {"event": "error", "kind": KIND, "message": TEXT}
#   KIND: bad_request, limit_unusable, busy (connection cap), broker (its own
#   failure), or a Refusal's value (stranger, run_cap)
#                   {"event": "stats", ...}
# The connection's lifetime is the grant's: closing it (or dying) releases.
MAX_MESSAGE_BYTES = 4096


@dataclass(frozen=True)
class AcquireRequest:
    """An ``acquire`` message, checked field by field."""

    limit: str
    occupy: int
    holder: dict[str, Any] | None


def parse_acquire(message: dict[str, Any]) -> AcquireRequest:
    """Check an ``acquire`` message; a bad field is a one-line error naming it.

    Raises:
        ValueError: ``limit`` is not a non-empty string, ``occupy`` not a whole
            number of at least 1 (``true``, ``1.5`` and ``null`` are refused,
            not rounded), or ``holder`` neither an object nor null.

    Example:
        >>> parse_acquire({"op": "acquire", "limit": "gpu:w", "occupy": 2}).occupy
        2
        >>> parse_acquire({"limit": "gpu:w", "occupy": True})
        Traceback (most recent call last):
        ...
        ValueError: occupy must be a whole number of slots >= 1, got true
    """
    limit = message.get("limit")
    if not isinstance(limit, str) or not limit:
        raise ValueError(f"limit must be a limit's name, got {json.dumps(limit)}")
    occupy = message.get("occupy", 1)
    if isinstance(occupy, bool) or not isinstance(occupy, int) or occupy < 1:
        raise ValueError(f"occupy must be a whole number of slots >= 1, got {json.dumps(occupy)}")
    holder = message.get("holder")
    if holder is not None and not isinstance(holder, dict):
        raise ValueError(f"holder must be an object or null, got {json.dumps(holder)}")
    return AcquireRequest(limit, occupy, holder)


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
