"""The floor of any gateway process: a relay that copies bytes between a client connection and
a connection of its own to the upstream, with no HTTP parsing at all (the benchmark's `floor`
phase measures its streams beside the direct ones).

Whatever a real gateway adds beyond what this adds is the gateway's own work; what this adds is
the machine's price for one more process in the path: two more socket reads and writes per
exchange and the wake-ups between processes. uvloop, one upstream connection per client
connection, opened when the client connects.

Usage: `python bench/minimal_relay.py --upstream-port N [--port 0]`; the first line on stdout is
`PORT <n>` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import Callable
from typing import cast


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)
        asyncio.get_running_loop().create_task(self.connect())

    def upstream_protocol(self) -> asyncio.Protocol:
        return Upstream(cast(asyncio.Transport, self.transport))

    async def connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(
                self.upstream_protocol, "127.0.0.1", self.upstream_port
            )
        except OSError:
            self.transport.close()
            return
        self.upstream = cast(asyncio.Transport, upstream)
        for data in self.pending:
            self.upstream.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(port: int, upstream_port: int, client: Callable[[int], asyncio.Protocol]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: client(upstream_port), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(client: Callable[[int], asyncio.Protocol] = Client, doc: str | None = __doc__) -> None:
    """Serve `client` connections (a protocol made with the upstream's port) until stopped."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    try:
        uvloop.run(serve(args.port, args.upstream_port, client))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
