"""The web server's protocol: a response's head leaves with its first body bytes, nothing is
held longer, lost or reordered (bodies, streams, keep-alive, `Connection: close`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from tests.helpers import free_port
from tide_vllm_cmd.app.options.http_protocol import (
    HeadHoldingHttpToolsProtocol,
    _HeadHoldingTransport,
)


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

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


async def test_a_head_leaves_with_the_first_body_bytes_and_the_rest_at_once():
    real = _RecordingTransport()
    transport = _HeadHoldingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(HEAD)
    assert real.writes == []  # held for the body
    transport.write(b"{}")
    assert real.writes == [HEAD + b"{}"]  # together, at once: the end of an answer is not held
    transport.write(b"data: 2\n\n")
    assert real.writes[1:] == [b"data: 2\n\n"]
    await asyncio.sleep(0)
    assert real.writes == [HEAD + b"{}", b"data: 2\n\n"]  # nothing sent twice
    assert transport.get_extra_info("socket") == "info:socket"


async def test_a_head_without_a_body_yet_leaves_when_the_turn_ends():
    real = _RecordingTransport()
    transport = _HeadHoldingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(HEAD)
    await asyncio.sleep(0)
    assert real.writes == [HEAD]


async def test_close_sends_the_held_head_first():
    real = _RecordingTransport()
    transport = _HeadHoldingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(HEAD)
    transport.close()
    assert real.writes == [HEAD] and real.closed
    await asyncio.sleep(0)
    assert real.writes == [HEAD]  # not twice


async def test_nothing_is_written_to_a_closed_connection():
    real = _RecordingTransport()
    transport = _HeadHoldingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(HEAD)
    real.closed = True  # the peer went away before the turn ended
    await asyncio.sleep(0)
    assert real.writes == []


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
        http=HeadHoldingHttpToolsProtocol,
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
