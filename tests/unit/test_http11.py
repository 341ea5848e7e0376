"""Http11Transport against real HTTP/1.1 servers on 127.0.0.1, written here on asyncio streams."""

import asyncio
import gzip
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from tide_vllm.infrastructure.vllm.http11 import Http11Transport
from tide_vllm.infrastructure.vllm.vllm_client import VLLMClient

TIMEOUTS = {"connect": 1.0, "read": 1.0, "write": 1.0, "pool": 1.0}


@dataclass
class Req:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass
class Conn:
    """What the server knows about one accepted connection."""

    requests: int = 0
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)


Handler = Callable[[Req, asyncio.StreamReader, asyncio.StreamWriter, Conn], Awaitable[bool | None]]


def response(body: bytes = b"", status: bytes = b"200 OK", headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), headers, body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


async def echo_path(req, reader, writer, conn):
    writer.write(response(req.target))


async def read_request(reader: asyncio.StreamReader) -> Req:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    req = Req(method, target, headers, b"")
    if (length := req.header(b"content-length")) is not None:
        req.body = await reader.readexactly(int(length))
    elif req.header(b"transfer-encoding") == b"chunked":
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            req.body += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
    return req


class Upstream:
    """Serves keep-alive connections: `handler` answers each request; returning False makes
    the server close the connection. A connection the client closes sets `client_closed`."""

    def __init__(self, handler: Handler = echo_path) -> None:
        self.handler = handler
        self.conns: list[Conn] = []
        self.requests: list[Req] = []
        self.got_request = asyncio.Event()
        self.client_closed = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> "Upstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    @property
    def accepts(self) -> int:
        return len(self.conns)

    async def _serve(self, reader, writer) -> None:
        conn = Conn()
        self.conns.append(conn)
        self._writers.append(writer)
        try:
            while True:
                try:
                    req = await read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    conn.client_closed.set()
                    self.client_closed.set()
                    return
                conn.requests += 1
                self.requests.append(req)
                self.got_request.set()
                if await self.handler(req, reader, writer, conn) is False:
                    return
                await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


@pytest.fixture
async def serve():
    servers = []

    async def start(handler: Handler = echo_path) -> Upstream:
        servers.append(await Upstream(handler).start())
        return servers[-1]

    yield start
    for s in servers:
        await s.close()


@pytest.fixture
async def make_transport():
    transports = []

    def make(**kwargs) -> Http11Transport:
        transports.append(Http11Transport(**kwargs))
        return transports[-1]

    yield make
    for t in transports:
        await t.aclose()


@pytest.fixture
async def client(serve, make_transport):
    """An AsyncClient on Http11Transport, talking to an echo_path server by default."""
    clients = []

    async def make(handler: Handler = echo_path, **kwargs) -> tuple[httpx.AsyncClient, Upstream]:
        upstream = await serve(handler)
        c = httpx.AsyncClient(
            transport=make_transport(**kwargs), base_url=upstream.url, timeout=1.0
        )
        clients.append(c)
        return c, upstream

    yield make
    for c in clients:
        await c.aclose()


def request(upstream: Upstream, path: str = "/", method: str = "GET", **kwargs) -> httpx.Request:
    return httpx.Request(method, upstream.url + path, extensions={"timeout": TIMEOUTS}, **kwargs)


# -- bodies


@pytest.mark.parametrize("via", ["client", "transport"])
async def test_a_json_body_goes_up_and_a_content_length_body_comes_back(via, client, serve):
    async def handler(req, reader, writer, conn):
        body = json.dumps({"got": json.loads(req.body)}).encode()
        writer.write(
            response(
                body,
                status=b"201 Created",
                headers=b"content-type: application/json\r\nx-dup: a\r\nx-dup: b\r\n",
            )
        )

    c, upstream = await client(handler)
    payload = {"model": "qwen", "messages": [{"role": "user", "content": "hi ü"}]}
    if via == "client":
        r = await c.post("/v1/chat?x=1", json=payload, headers={"x-request-id": "r-1"})
    else:
        r = await c._transport.handle_async_request(
            request(upstream, "/v1/chat?x=1", "POST", json=payload, headers={"x-request-id": "r-1"})
        )
        await r.aread()
    assert (r.status_code, r.reason_phrase, r.http_version) == (201, "Created", "HTTP/1.1")
    assert r.headers["content-type"] == "application/json"
    assert r.headers.get_list("x-dup") == ["a", "b"]
    assert r.json() == {"got": payload}
    assert r.request.url.path == "/v1/chat"
    (sent,) = upstream.requests
    assert (sent.method, sent.target) == (b"POST", b"/v1/chat?x=1")
    assert json.loads(sent.body) == payload
    assert sent.header(b"host") == f"127.0.0.1:{upstream.port}".encode()
    assert sent.header(b"content-length") == str(len(sent.body)).encode()
    assert sent.header(b"x-request-id") == b"r-1"


async def test_a_chunked_body_is_decoded(client):
    async def handler(req, reader, writer, conn):
        writer.write(CHUNKED_HEAD + chunk(b"hello ") + chunk(b"chunked ") + chunk(b"world"))
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    c, _ = await client(handler)
    r = await c.get("/")
    assert r.content == b"hello chunked world"


async def test_server_sent_events_pass_through_one_by_one_as_they_arrive(client):
    # Each event is written only once the client has what came before: any buffering in the
    # transport would deadlock, and the client's waits time out.
    head_received, first_received = asyncio.Event(), asyncio.Event()

    async def handler(req, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(head_received.wait(), 1.5)
        await asyncio.sleep(0.01)  # let the client wait for the event
        writer.write(chunk(b"data: 1\n\n"))
        await writer.drain()
        await asyncio.wait_for(first_received.wait(), 1.5)
        await asyncio.sleep(0.01)
        writer.write(chunk(b"data: 2\n\n"))
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    c, _ = await client(handler)
    async with c.stream("POST", "/v1/chat/completions", json={"stream": True}) as r:
        head_received.set()
        parts = r.aiter_raw()
        assert await asyncio.wait_for(anext(parts), 1) == b"data: 1\n\n"
        first_received.set()
        assert await asyncio.wait_for(anext(parts), 1) == b"data: 2\n\n"
        assert [p async for p in parts] == []


async def test_a_body_ending_with_the_connection_is_read_to_the_end(client):
    async def handler(req, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart 1, ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"part 2")
        return False

    c, _ = await client(handler)
    assert (await c.get("/")).content == b"part 1, part 2"


async def test_a_large_body_read_slowly_arrives_whole(client):
    # More than the transport buffers before it stops reading the socket, and a consumer that
    # lags: if reading were not resumed, this would hang.
    blob = bytes(range(256)) * 4096 * 4  # 4 MiB

    async def handler(req, reader, writer, conn):
        writer.write(response(blob))

    c, _ = await client(handler)
    got = bytearray()
    async with c.stream("GET", "/") as r:
        async for part in r.aiter_raw():
            got += part
            await asyncio.sleep(0.005)
    assert got == blob
    assert (await c.get("/")).status_code == 200


async def test_an_interim_100_response_is_skipped(client):
    async def handler(req, reader, writer, conn):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + response(b"final"))

    c, _ = await client(handler)
    r = await c.get("/")
    assert (r.status_code, r.content) == (200, b"final")


async def test_a_head_response_has_no_body_and_does_not_hang(client):
    async def handler(req, reader, writer, conn):
        if req.method == b"HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        else:
            writer.write(response(b"hello"))

    c, _ = await client(handler)
    r = await c.head("/")
    assert (r.status_code, r.headers["content-length"], r.content) == (200, "5", b"")
    assert (await c.get("/")).content == b"hello"


async def test_a_streamed_request_body_is_read_and_sent_whole(client):
    async def echo_body(req, reader, writer, conn):
        writer.write(response(req.body))

    async def parts():
        yield b"streamed "
        yield b"body"

    c, upstream = await client(echo_body)
    r = await c.post("/", content=parts())
    assert r.content == b"streamed body"
    assert upstream.requests[0].header(b"transfer-encoding") == b"chunked"


async def test_a_header_with_a_line_break_is_refused_before_sending(client):
    c, upstream = await client()
    with pytest.raises(httpx.LocalProtocolError):
        await c.get("/", headers={"x-id": "a\r\nx-injected: 1"})
    assert (await c.get("/ok")).content == b"/ok"
    assert [r.target for r in upstream.requests] == [b"/ok"]


async def test_https_is_refused(make_transport):
    with pytest.raises(httpx.UnsupportedProtocol):
        await make_transport().handle_async_request(httpx.Request("GET", "https://127.0.0.1/"))


# -- connection reuse


async def test_sequential_requests_share_one_keep_alive_connection(client):
    c, upstream = await client()
    for i in range(20):
        assert (await c.get(f"/{i}")).content == f"/{i}".encode()
    assert upstream.accepts == 1


async def test_connection_close_from_the_server_makes_the_next_request_open_a_new_one(client):
    async def handler(req, reader, writer, conn):
        # Announces the close but leaves the connection open: only the client can honour it.
        writer.write(response(req.target, headers=b"connection: close\r\n"))

    c, upstream = await client(handler)
    assert (await c.get("/a")).content == b"/a"
    assert (await c.get("/b")).content == b"/b"
    assert upstream.accepts == 2
    assert [conn.requests for conn in upstream.conns] == [1, 1]
    await asyncio.wait_for(upstream.conns[0].client_closed.wait(), 1)


async def test_an_idle_connection_older_than_keepalive_expiry_is_closed_not_reused(client):
    c, upstream = await client(keepalive_expiry=0.05)
    assert (await c.get("/a")).content == b"/a"
    assert (await c.get("/b")).content == b"/b"
    await asyncio.sleep(0.1)
    assert (await c.get("/c")).content == b"/c"
    assert [conn.requests for conn in upstream.conns] == [2, 1]
    await asyncio.wait_for(upstream.conns[0].client_closed.wait(), 1)


async def test_an_idle_connection_the_server_closed_is_not_a_failure(client):
    async def handler(req, reader, writer, conn):
        writer.write(response(req.target))
        asyncio.get_running_loop().call_later(0.05, writer.close)

    c, upstream = await client(handler)
    assert (await c.get("/a")).content == b"/a"
    await asyncio.sleep(0.15)
    assert (await c.get("/b")).content == b"/b"
    assert upstream.accepts == 2


async def test_a_reused_connection_closed_as_the_request_is_sent_is_retried_once(client):
    async def handler(req, reader, writer, conn):
        if conn.requests > 1:  # the keep-alive race: the server closes, ignoring the request
            return False
        writer.write(response(req.target))

    c, upstream = await client(handler)
    assert (await c.get("/a")).content == b"/a"
    assert (await c.get("/b")).content == b"/b"
    assert [r.target for r in upstream.requests] == [b"/a", b"/b", b"/b"]
    assert upstream.accepts == 2


async def test_the_retry_happens_once_only(client):
    async def handler(req, reader, writer, conn):
        if len(upstream.requests) > 1:
            return False
        writer.write(response(req.target))

    c, upstream = await client(handler)
    await c.get("/a")
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await c.get("/b")
    assert [r.target for r in upstream.requests] == [b"/a", b"/b", b"/b"]


async def test_a_new_connection_closed_without_a_response_is_not_retried(client):
    async def handler(req, reader, writer, conn):
        return False

    c, upstream = await client(handler)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await c.get("/")
    assert len(upstream.requests) == 1


async def test_a_reused_connection_closed_after_part_of_the_response_is_not_retried(client):
    async def handler(req, reader, writer, conn):
        if conn.requests > 1:
            writer.write(b"HTTP/1.1 200 OK\r\n")
            return False
        writer.write(response(req.target))

    c, upstream = await client(handler)
    await c.get("/a")
    with pytest.raises(httpx.RemoteProtocolError):
        await c.get("/b")
    assert len(upstream.requests) == 2


async def test_a_thousand_requests_fifty_at_a_time_all_succeed_on_at_most_fifty_connections(
    client,
):
    c, upstream = await client()
    limit = asyncio.Semaphore(50)

    async def one(i: int) -> bytes:
        async with limit:
            return (await c.get(f"/{i}")).content

    bodies = await asyncio.gather(*(one(i) for i in range(1000)))
    assert bodies == [f"/{i}".encode() for i in range(1000)]
    assert upstream.accepts <= 50


# -- closing, cancelling


async def test_closing_a_half_read_stream_closes_the_connection(client):
    async def handler(req, reader, writer, conn):
        if req.target == b"/stream":
            writer.write(CHUNKED_HEAD + chunk(b"token 1 "))  # and never more
        else:
            writer.write(response(req.target))

    c, upstream = await client(handler)
    async with c.stream("POST", "/stream") as r:
        assert await anext(r.aiter_raw()) == b"token 1 "
    await asyncio.wait_for(upstream.conns[0].client_closed.wait(), 1)
    assert (await c.get("/next")).content == b"/next"
    assert upstream.accepts == 2


async def test_cancelling_while_waiting_for_the_head_closes_the_connection_and_frees_the_slot(
    serve, make_transport
):
    async def handler(req, reader, writer, conn):
        if req.target != b"/hang":
            writer.write(response(req.target))

    upstream = await serve(handler)
    transport = make_transport(max_connections=1)
    task = asyncio.create_task(transport.handle_async_request(request(upstream, "/hang")))
    await asyncio.wait_for(upstream.got_request.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(upstream.conns[0].client_closed.wait(), 1)
    r = await transport.handle_async_request(request(upstream, "/ok"))
    assert await r.aread() == b"/ok"


async def test_closing_the_transport_closes_its_connections_and_refuses_new_requests(
    serve, make_transport
):
    upstream = await serve()
    transport = make_transport()
    r = await transport.handle_async_request(request(upstream, "/a"))
    assert await r.aread() == b"/a"
    await transport.aclose()
    await asyncio.wait_for(upstream.client_closed.wait(), 1)
    with pytest.raises(httpx.ConnectError, match="transport closed"):
        await transport.handle_async_request(request(upstream, "/b"))


# -- timeouts and errors


async def test_no_response_head_in_time_is_a_read_timeout(client):
    async def handler(req, reader, writer, conn):
        pass  # never answers

    c, upstream = await client(handler)
    with pytest.raises(httpx.ReadTimeout):
        await c.get("/", timeout=httpx.Timeout(1.0, read=0.1))
    await asyncio.wait_for(upstream.client_closed.wait(), 1)


async def test_a_pause_between_body_chunks_is_a_read_timeout(client):
    async def handler(req, reader, writer, conn):
        writer.write(CHUNKED_HEAD + chunk(b"first"))  # then silence

    c, _ = await client(handler)
    async with c.stream("GET", "/", timeout=httpx.Timeout(1.0, read=0.1)) as r:
        parts = r.aiter_raw()
        assert await anext(parts) == b"first"
        with pytest.raises(httpx.ReadTimeout):
            await anext(parts)


async def test_a_short_read_timeout_after_a_long_one_on_the_same_connection_still_holds(client):
    async def handler(req, reader, writer, conn):
        if req.target == b"/quick":
            writer.write(response(b"ok"))  # else never answers

    c, upstream = await client(handler)
    assert (await c.get("/quick", timeout=httpx.Timeout(1.0, read=30))).text == "ok"
    started = asyncio.get_running_loop().time()
    with pytest.raises(httpx.ReadTimeout):
        await c.get("/silent", timeout=httpx.Timeout(1.0, read=0.1))
    assert asyncio.get_running_loop().time() - started < 1.0  # not the 30 s of the first
    assert upstream.accepts == 1  # the same connection


async def test_a_refused_connection_is_a_connect_error(make_transport):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(httpx.ConnectError, match="(?i)refused"):
        await make_transport().handle_async_request(
            httpx.Request("GET", f"http://127.0.0.1:{port}/", extensions={"timeout": TIMEOUTS})
        )


async def test_no_free_connection_in_time_is_a_pool_timeout(client):
    async def handler(req, reader, writer, conn):
        if req.target == b"/hold":
            writer.write(CHUNKED_HEAD + chunk(b"held"))
        else:
            writer.write(response(req.target))

    c, _ = await client(handler, max_connections=1)
    async with c.stream("GET", "/hold") as held:
        assert await anext(held.aiter_raw()) == b"held"
        with pytest.raises(httpx.PoolTimeout):
            await c.get("/", timeout=httpx.Timeout(1.0, pool=0.1))
    assert (await c.get("/after")).content == b"/after"


async def test_a_waiting_request_gets_the_connection_a_finished_one_frees(client):
    release = asyncio.Event()

    async def handler(req, reader, writer, conn):
        if req.target == b"/slow":
            await release.wait()
        writer.write(response(req.target))

    c, upstream = await client(handler, max_connections=1)
    slow = asyncio.create_task(c.get("/slow"))
    await asyncio.wait_for(upstream.got_request.wait(), 1)
    waiting = asyncio.create_task(c.get("/waiting"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    release.set()
    assert [(await slow).content, (await waiting).content] == [b"/slow", b"/waiting"]
    assert upstream.accepts == 1


@pytest.mark.parametrize(
    ("how", "error"), [("fin", httpx.RemoteProtocolError), ("rst", httpx.ReadError)]
)
async def test_the_server_closing_mid_body_is_an_error(how, error, client):
    async def handler(req, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(0.05)
        if how == "rst":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        return False

    c, _ = await client(handler)
    async with c.stream("GET", "/") as r:
        with pytest.raises(error):
            await r.aread()


@pytest.mark.parametrize(
    "garbage",
    [b"SPDY/9 nonsense\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: ten\r\n\r\n"],
)
async def test_a_malformed_response_is_a_remote_protocol_error(garbage, client):
    async def handler(req, reader, writer, conn):
        writer.write(garbage)

    c, _ = await client(handler)
    with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
        await c.get("/")


# -- send_bytes: a request the caller wrote as bytes, and VLLMClient's chat path on it


async def test_send_bytes_sends_the_bytes_as_they_are_and_reuses_the_connection(
    serve, make_transport
):
    async def handler(req, reader, writer, conn):
        writer.write(response(req.body[::-1], headers=b"content-type: text/plain\r\n"))

    upstream = await serve(handler)
    transport = make_transport()
    for body in (b"first", b"second"):
        data = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        answer = await transport.send_bytes("127.0.0.1", upstream.port, data, TIMEOUTS)
        assert answer.status == 200
        assert (b"content-type", b"text/plain") in answer.headers
        assert b"".join([part async for part in answer]) == body[::-1]
    assert [r.body for r in upstream.requests] == [b"first", b"second"]
    assert upstream.accepts == 1


async def test_send_bytes_times_out_and_refuses_after_the_transport_closed(serve, make_transport):
    async def silent(req, reader, writer, conn):
        await asyncio.sleep(5)

    upstream = await serve(silent)
    transport = make_transport()
    data = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
    timeouts = {**TIMEOUTS, "read": 0.1}
    with pytest.raises(httpx.ReadTimeout):
        await transport.send_bytes("127.0.0.1", upstream.port, data, timeouts)
    await transport.aclose()
    with pytest.raises(httpx.ConnectError):
        await transport.send_bytes("127.0.0.1", upstream.port, data, timeouts)


async def test_vllm_client_writes_the_chat_request_vllm_expects(serve):
    async def handler(req, reader, writer, conn):
        writer.write(response(b'{"ok": true}', headers=b"content-type: application/json\r\n"))

    upstream = await serve(handler)
    client = VLLMClient(upstream.url, timeout=1.0, api_key="sk-1")
    try:
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi ü"}]}
        reply = await client.chat_completions(payload, "r-9")
        with pytest.raises(ValueError, match="CR or LF"):
            await client.chat_completions(payload, "r\r\nx-evil: 1")
    finally:
        await client.aclose()
    assert (reply.status_code, reply.content_type, reply.content) == (
        200, "application/json", b'{"ok": true}',
    )  # fmt: skip
    (sent,) = upstream.requests
    assert (sent.method, sent.target) == (b"POST", b"/v1/chat/completions")
    assert json.loads(sent.body) == payload
    assert sent.header(b"host") == f"127.0.0.1:{upstream.port}".encode()
    assert sent.header(b"content-type") == b"application/json"
    assert sent.header(b"authorization") == b"Bearer sk-1"
    assert sent.header(b"x-request-id") == b"r-9"
    assert sent.header(b"content-length") == str(len(sent.body)).encode()


async def test_vllm_client_decodes_an_answer_compressed_anyway(serve):
    async def handler(req, reader, writer, conn):
        writer.write(response(gzip.compress(b'{"ok": 1}'), headers=b"content-encoding: gzip\r\n"))

    upstream = await serve(handler)
    client = VLLMClient(upstream.url, timeout=1.0)
    try:
        reply = await client.chat_completions({"messages": []}, "r-1")
    finally:
        await client.aclose()
    assert reply.content == b'{"ok": 1}'


def test_vllm_client_refuses_an_api_key_with_a_line_break():
    with pytest.raises(ValueError, match="CR or LF"):
        VLLMClient("http://127.0.0.1:1", timeout=1.0, api_key="sk\r\nx-evil: 1")
