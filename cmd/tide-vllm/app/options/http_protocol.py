"""uvicorn's httptools protocol with each response's head sent together with its first body
bytes, and one keep-alive timer per connection instead of one per response.

uvicorn writes a response's head and each part of its body with a write of its own, and uvloop
sends each at once: a system call each, and for a client on another core a wake-up each. Here the
head is held until the next write, which carries it: a whole answer leaves in one packet, and a
stream's head leaves with its first event, so the client wakes once, with the first token in
hand. Every write after the head goes out at once, as before (the end of a response is never
held behind the work that follows it). A head with no body written in the same turn of the loop
goes out at the turn's end (`call_soon`).

uvicorn arms a timer when a response ends and cancels it when the next request arrives, to
close a connection idle for `timeout_keep_alive` seconds: two timer operations per request,
~2 % of the gateway's CPU time. Here a response's end only notes the time; one timer per
connection looks when it fires, and closes the connection or waits the rest of the time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD = b"HTTP/1.1 "  # how uvicorn's every response head (and nothing else it writes) starts


class _HeadHoldingTransport:
    """A transport that holds a response's head until the next write or the turn's end."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(_HEAD):
            self._held = data
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class HeadHoldingHttpToolsProtocol(HttpToolsProtocol):
    _idle_since: float | None = None  # when the last response ended, if nothing came since

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_HeadHoldingTransport(transport, self.loop))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        timer = self.timeout_keep_alive_task
        if timer is not None:
            self.timeout_keep_alive_task = None
            timer.cancel()

    def _unset_keepalive_if_required(self) -> None:
        # Called by uvicorn when data arrives: the connection is not idle (the timer stays).
        self._idle_since = None

    def on_response_complete(self) -> None:
        if self.pipeline or self.transport.is_closing():
            super().on_response_complete()  # starts the next pipelined request; arms no timer
            return
        # uvicorn's otherwise, with the keep-alive timer armed only if none is.
        self.server_state.total_requests += 1
        self.flow.resume_reading()
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_due
            )

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        idle_since = self._idle_since
        if idle_since is None:
            return  # busy: the next response's end arms the timer again
        left = idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()
