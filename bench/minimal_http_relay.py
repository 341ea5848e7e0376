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

import asyncio

import httptools
import minimal_relay
import orjson
from minimal_relay import _nodelay, main

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


class Client(minimal_relay.Client):
    """The byte relay's client connection, with HTTP on both sides."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.held = b""  # the answer's head, until its first body bytes
        self.out: list[bytes] = []

    def upstream_protocol(self) -> asyncio.Protocol:
        return Upstream(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

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
        super().data_received(head + raw)  # to the upstream, once connected

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


if __name__ == "__main__":
    main(Client, __doc__)
