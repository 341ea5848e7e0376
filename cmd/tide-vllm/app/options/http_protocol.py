"""uvicorn's httptools protocol with the writes of one loop turn sent together.

uvicorn writes a response's head and each part of its body with a write of its own, and uvloop
sends each at once: a system call each, and for a client on another core a wake-up each. A
stream's head and first event, or a whole answer's head and body, are written in the same
turn of the loop; gathered, they leave in one packet, so the client wakes once, with the
first token in hand. The writes are sent at the end of the turn (`call_soon`), before the loop
waits for anything: no data is held longer than the code that wrote it runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _GatheringTransport:
    """A transport whose writes within one loop turn go out as one."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class GatheringHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        gathering = _GatheringTransport(transport, self.loop)
        super().connection_made(gathering)  # type: ignore[arg-type]
