"""The floor of a gateway that speaks HTTP, for the benchmark's `floor` phase: it parses each
request (httptools) and its JSON body (orjson), sends the body to the upstream under a head of
its own, parses the upstream's answer (httptools) and sends its status and body on, re-framed,
each part as it arrives. Nothing else: no framework, no ASGI, no task or coroutine per request
(protocol callbacks only), no checks, ids, metrics or logs; OpenAI's chat path only.

What it adds beyond what bench/minimal_relay.py (bytes only) adds is the price of HTTP and JSON
in Python on this machine; what tide-vllm adds beyond this is its framework and its own work.

Usage: `python bench/minimal_http_relay.py --upstream-port N [--port 0]`; the first line on
stdout is `PORT <n>` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import httptools
import orjson
from minimal_relay import _nodelay

REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Internal Server Error"}


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, for one client connection."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.content_type = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        self.client.flush()  # what one read brought goes out in one write

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()

    def on_message_begin(self) -> None:
        self.content_type = b"application/json"

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value

    def on_headers_complete(self) -> None:
        self.client.start(self.parser.get_status_code(), self.content_type)

    def on_body(self, body: bytes) -> None:
        self.client.send(body)

    def on_message_complete(self) -> None:
        self.client.end()


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.held = b""  # the answer's head, until its first body bytes
        self.out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(
                lambda: Upstream(self), "127.0.0.1", self.upstream_port
            )
        except OSError:
            self.close()
            return
        self.upstream = cast(asyncio.Transport, upstream)
        for data in self.pending:
            self.upstream.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- the request
    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        raw = b"".join(self.body)
        payload = orjson.loads(raw)  # a gateway reads what it is sent
        if not isinstance(payload, dict) or "messages" not in payload:
            self.close()
            return
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(raw)
        )
        if self.upstream is not None:
            self.upstream.write(head + raw)
        else:
            self.pending.append(head + raw)

    # -- the answer, from the upstream
    def start(self, status: int, content_type: bytes) -> None:
        self.held = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n" % (
            status,
            REASONS.get(status, b"Status"),
            content_type,
        )

    def send(self, body: bytes) -> None:
        self.out.append(b"%x\r\n%b\r\n" % (len(body), body))

    def end(self) -> None:
        self.out.append(b"0\r\n\r\n")

    def flush(self) -> None:
        if self.out and self.transport is not None:
            self.transport.write(self.held + b"".join(self.out))
            self.held = b""
            self.out.clear()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(upstream_port), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    try:
        uvloop.run(serve(args.port, args.upstream_port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
