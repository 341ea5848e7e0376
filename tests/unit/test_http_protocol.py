"""The web server's protocol (uvicorn's connections, tide-vllm's request cycle): a response's
head leaves with its first body bytes, nothing is held longer, lost or reordered (bodies,
streams, keep-alive, `Connection: close`, pipelining); requests arrive as uvicorn would give them
(paths, query strings, bodies in parts, `Expect: 100-continue`); `receive` tells the disconnect;
a bad response is refused as uvicorn refuses it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from tests.helpers import free_port
from tide_vllm_cmd.app.options.http_protocol import GatewayHttpProtocol, RequestCycle


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _Flow:
    write_paused = False

    def resume_reading(self) -> None:
        pass


class _Server:
    default_headers = [(b"server", b"t")]


class _Protocol:
    """What a request cycle uses of its connection."""

    def __init__(self) -> None:
        self.transport = _RecordingTransport()
        self.flow = _Flow()
        self.loop = asyncio.get_running_loop()
        self.server_state = _Server()
        self.responses = 0

    def on_response_complete(self) -> None:
        self.responses += 1


def _cycle(method: str = "GET") -> tuple[RequestCycle, _Protocol]:
    protocol = _Protocol()
    scope = {"type": "http", "method": method, "path": "/"}
    return RequestCycle(scope, protocol, True, False), protocol  # type: ignore[arg-type]


START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
HEAD = b"HTTP/1.1 200 OK\r\nserver: t\r\ncontent-length: 2\r\n\r\n"


async def test_a_whole_answer_leaves_in_one_write():
    cycle, protocol = _cycle()
    await cycle.send(START)
    assert protocol.transport.writes == []  # the head waits for the body
    await cycle.send({"type": "http.response.body", "body": b"{}"})
    assert protocol.transport.writes == [HEAD + b"{}"]
    assert protocol.responses == 1
    await asyncio.sleep(0)
    assert protocol.transport.writes == [HEAD + b"{}"]  # nothing sent twice


async def test_a_stream_head_leaves_with_its_first_event_and_each_event_at_once():
    cycle, protocol = _cycle()
    await cycle.send({"type": "http.response.start", "status": 200, "headers": []})
    await cycle.send({"type": "http.response.body", "body": b"", "more_body": True})
    assert protocol.transport.writes == []  # an empty part does not send the head
    await cycle.send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    head = b"HTTP/1.1 200 OK\r\nserver: t\r\ntransfer-encoding: chunked\r\n\r\n"
    assert protocol.transport.writes == [head + b"9\r\ndata: 1\n\n\r\n"]
    await cycle.send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": True})
    await cycle.send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    assert protocol.transport.writes[1:] == [
        b"9\r\ndata: 2\n\n\r\n",
        b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n",  # the last event and the body's end: one write
    ]
    assert protocol.responses == 1


async def test_a_head_without_a_body_yet_leaves_when_the_turn_ends():
    cycle, protocol = _cycle()
    await cycle.send(START)
    await asyncio.sleep(0)
    assert protocol.transport.writes == [HEAD]
    await cycle.send({"type": "http.response.body", "body": b"{}"})
    assert protocol.transport.writes == [HEAD, b"{}"]


async def test_nothing_is_written_to_a_connection_lost_meanwhile():
    cycle, protocol = _cycle()
    await cycle.send(START)
    cycle.lost()
    await asyncio.sleep(0)
    assert protocol.transport.writes == []
    assert await cycle.receive() == {"type": "http.disconnect"}


async def test_a_head_request_gets_the_head_only():
    cycle, protocol = _cycle("HEAD")
    await cycle.send(START)
    await cycle.send({"type": "http.response.body", "body": b"{}"})
    assert protocol.transport.writes == [HEAD]


@pytest.mark.parametrize(
    "headers, error",
    [
        ([(b"x-id", b"a\r\nset-cookie: b")], "Invalid HTTP header value."),
        ([(b"x id", b"a")], "Invalid HTTP header name."),
    ],
)
async def test_a_header_that_would_split_the_head_is_refused(headers, error):
    cycle, protocol = _cycle()
    with pytest.raises(RuntimeError, match=error):
        await cycle.send({"type": "http.response.start", "status": 200, "headers": headers})
    await asyncio.sleep(0)
    assert protocol.transport.writes == []


async def test_header_names_go_out_lower_case_from_any_iterable_of_pairs():
    cycle, protocol = _cycle()
    pairs = ([b"Content-Length", b"2"], [b"X-Request-Id", b"Ab"], (b"Connection", b"Close"))
    start = {"type": "http.response.start", "status": 200, "headers": (p for p in pairs)}
    await cycle.send(start)
    await cycle.send({"type": "http.response.body", "body": b"{}"})
    assert protocol.transport.writes == [
        b"HTTP/1.1 200 OK\r\nserver: t\r\ncontent-length: 2\r\nx-request-id: Ab\r\n"
        b"connection: Close\r\n\r\n{}"
    ]
    assert protocol.transport.closed  # `Connection: close`, whatever its case


async def test_a_response_without_headers_from_a_server_without_default_headers():
    cycle, protocol = _cycle()
    protocol.server_state.default_headers = []
    await cycle.send({"type": "http.response.start", "status": 200})
    await cycle.send({"type": "http.response.body", "body": b"hi"})
    assert protocol.transport.writes == [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    ]


async def test_the_server_headers_follow_the_servers_list_when_it_changes():
    cycle, protocol = _cycle()
    protocol.server_state.default_headers = [(b"date", b"one"), (b"server", b"t")]
    await cycle.send(START)
    await cycle.send({"type": "http.response.body", "body": b"{}"})
    cycle, protocol2 = _cycle()
    protocol2.server_state.default_headers = [(b"date", b"two"), (b"server", b"t")]
    await cycle.send(START)
    await cycle.send({"type": "http.response.body", "body": b"{}"})
    assert b"date: one\r\n" in protocol.transport.writes[0]
    assert b"date: two\r\n" in protocol2.transport.writes[0]


async def test_a_body_longer_or_shorter_than_its_content_length_is_refused():
    cycle, _ = _cycle()
    await cycle.send(START)
    with pytest.raises(RuntimeError, match="longer"):
        await cycle.send({"type": "http.response.body", "body": b"{}{}"})
    cycle, _ = _cycle()
    await cycle.send(START)
    with pytest.raises(RuntimeError, match="shorter"):
        await cycle.send({"type": "http.response.body", "body": b"{"})


async def test_receive_gives_the_body_then_waits_for_the_end_of_the_response():
    cycle, _ = _cycle()
    cycle.add_body(b"ab")
    cycle.add_body(b"cd")
    assert await cycle.receive() == {"type": "http.request", "body": b"abcd", "more_body": True}
    later = asyncio.ensure_future(cycle.receive())
    await asyncio.sleep(0.01)
    assert not later.done()  # nothing new yet
    cycle.end_body()
    assert await later == {"type": "http.request", "body": b"", "more_body": False}
    disconnect = asyncio.ensure_future(cycle.receive())
    await asyncio.sleep(0.01)
    assert not disconnect.done()  # what a disconnect watcher waits on
    await cycle.send(START)
    await cycle.send({"type": "http.response.body", "body": b"{}"})
    assert await asyncio.wait_for(disconnect, 1) == {"type": "http.disconnect"}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    body = scope["path"].encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(asgi: Any = app, **settings: Any) -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn.Config(
        asgi,
        port=port,
        http=GatewayHttpProtocol,
        lifespan="off",
        log_config=None,
        **settings,
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def test_answers_and_streams_arrive_whole_and_in_order():
    async with serving() as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        for i in range(20):  # one kept-alive connection, many answers
            response = await c.get(f"/answer-{i}")
            assert response.status_code == 200 and response.text == f"/answer-{i}"
        async with c.stream("GET", "/stream") as response:
            parts = [part async for part in response.aiter_raw()]
        assert b"".join(parts) == b"one two three"
        assert len(parts) == 3  # each part sent as it was written, not held back
        response = await c.get("/bye", headers={"connection": "close"})
        assert response.text == "/bye"  # written before the server closed the connection


@pytest.mark.parametrize("size", [1, 300_000])
async def test_a_large_body_is_not_cut(size):
    body = b"x" * size

    async def big(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"content-length", str(size).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async with serving(big) as port, httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.content == body


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout_a_busy_one_is_not():
    async with serving(timeout_keep_alive=0.3) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n"
        answer = b"HTTP/1.1 200 OK\r\n"
        for _ in range(6):  # 0.6 s of requests 0.1 s apart: longer than the timeout, never idle
            writer.write(request)
            assert (await reader.readuntil(b"\r\n\r\n/x")).startswith(answer)
            await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 2) == b""  # closed by the server
        idle = asyncio.get_running_loop().time() - started
        assert 0.1 < idle < 1.0  # after 0.3 s idle (0.2 s more here), not at once nor never
        writer.close()


async def test_pipelined_requests_are_answered_in_order():
    async with serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(b"GET /p%d HTTP/1.1\r\nhost: t\r\n\r\n" % i for i in range(3)))
        answers = [await reader.readuntil(b"\r\n\r\n/p%d" % i) for i in range(3)]
        assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)
        writer.close()


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with what it was given: path, query, method and the body's parts."""
    if scope["type"] != "http":
        return
    parts = []
    while True:
        message = await receive()
        parts.append(message["body"])
        if not message["more_body"]:
            break
    if scope["path"] == "/boom":
        raise RuntimeError("a bug")
    text = f"{scope['method']} {scope['path']} {scope['query_string'].decode()} {len(parts)}:"
    body = text.encode() + b"".join(parts)
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def test_requests_arrive_as_uvicorn_gives_them():
    async with serving(echo) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            assert (await c.get("/a/b")).text == "GET /a/b  1:"
            assert (await c.get("/a%20b/c?x=1&y=%20")).text == "GET /a b/c x=1&y=%20 1:"
            assert (await c.post("/p", content=b"hello")).text == "POST /p  1:hello"

            async def parts() -> AsyncIterator[bytes]:
                for part in (b"one ", b"two"):
                    yield part
                    await asyncio.sleep(0.05)

            answer = await c.post("/chunked", content=parts())  # transfer-encoding: chunked
            assert answer.text.startswith("POST /chunked  ") and answer.text.endswith(":one two")
            answer = await c.post("/e", content=b"x", headers={"expect": "100-continue"})
            assert answer.text == "POST /e  1:x"
            answer = await c.get("/boom")
            assert answer.status_code == 500 and answer.text == "Internal Server Error"
            assert (await c.get("/after")).text == "GET /after  1:"  # the server goes on


async def test_expect_100_continue_gets_its_interim_answer_before_the_body_is_sent():
    async with serving(echo) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /e HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
        )
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(b"hi")
        answer = await asyncio.wait_for(reader.readuntil(b"POST /e  1:hi"), 2)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        writer.close()


async def test_a_client_that_leaves_mid_stream_is_told_to_the_app():
    told = asyncio.get_running_loop().create_future()

    async def streaming(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        told.set_result(await receive())  # waits until the client leaves

    async with serving(streaming) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /s HTTP/1.1\r\nhost: t\r\n\r\n")
        assert b"data: 1" in await asyncio.wait_for(reader.readuntil(b"data: 1\n\n"), 2)
        writer.close()
        assert await asyncio.wait_for(told, 2) == {"type": "http.disconnect"}


async def test_an_app_failing_after_its_answer_started_closes_the_connection():
    async def half(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("a bug mid-answer")

    async with serving(half) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /h HTTP/1.1\r\nhost: t\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), 2)  # to the end: the server closed
        assert received.startswith(b"HTTP/1.1 200 OK\r\n") and b"4\r\npart\r\n" in received
        assert not received.endswith(b"0\r\n\r\n")  # not passed off as a whole answer
        writer.close()


async def test_an_http_1_0_request_is_answered_then_its_connection_closed():
    async with serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /old HTTP/1.0\r\nhost: t\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), 2)  # to the end: the server closed
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close" in head
        assert body == b"/old"
        writer.close()
