"""In-memory connections: what a Unix socket gives the broker, without a socket.

:func:`connection` returns the two ends of one connection. Each end is an
``asyncio.StreamReader`` and a writer with the part of ``asyncio.StreamWriter``
the broker and the step client use. Closing a writer ends the peer's reader
(EOF), as a closed or dropped socket does.
"""

from __future__ import annotations

import asyncio
from typing import Any


class MemoryWriter:
    """Writes into the peer's reader; ``close`` is the peer's EOF."""

    def __init__(self, peer: asyncio.StreamReader) -> None:
        self._peer = peer
        self._closed = False

    def write(self, data: bytes) -> None:
        if self._closed:
            return  # a socket's write after close is dropped too (and raises on drain)
        self._peer.feed_data(data)

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("connection closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._peer.feed_eof()

    def is_closing(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket: the broker records no peer pid


def connection() -> tuple[
    tuple[asyncio.StreamReader, MemoryWriter], tuple[asyncio.StreamReader, MemoryWriter]
]:
    """``(client_reader, client_writer), (server_reader, server_writer)`` of one connection."""
    client_reader, server_reader = asyncio.StreamReader(), asyncio.StreamReader()
    return (client_reader, MemoryWriter(server_reader)), (
        server_reader,
        MemoryWriter(client_reader),
    )
