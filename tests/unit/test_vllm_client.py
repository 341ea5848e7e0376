"""VLLMClient against real HTTP/1.1 servers on 127.0.0.1: a raw one whose answers the tests
write byte by byte (RawUpstream), and the fake vLLM served by uvicorn (ServerThread)."""

import asyncio
import gzip
import json
import socket
import struct
import time
import zlib

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from httpx_aiohttp import AiohttpTransport

from tests.fakes.upstream import (
    MODEL,
    RawUpstream,
    Recorder,
    ServerThread,
    build_upstream,
    echo_target,
    raw_chunk,
    raw_response,
)
from tests.helpers import free_port
from tide_vllm.domain.chat.entity import EngineFailed, EngineTimeout, EngineUnavailable
from tide_vllm.infrastructure.vllm.vllm_client import VLLMClient

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.fixture
async def serve():
    servers: list[RawUpstream] = []

    async def start(handler=echo_target) -> RawUpstream:
        servers.append(await RawUpstream(handler).start())
        return servers[-1]

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def client():
    """A VLLMClient (1 s timeout unless told) in front of a RawUpstream with `handler`."""
    made: list[VLLMClient] = []

    async def make(upstream: RawUpstream, **options) -> VLLMClient:
        made.append(VLLMClient(upstream.url, options.pop("timeout", 1.0), **options))
        return made[-1]

    yield make
    for c in made:
        await c.aclose()


@pytest.fixture(scope="module")
def fake_vllm():
    recorder = Recorder()
    with ServerThread(build_upstream(recorder), free_port()) as server:
        server.recorder = recorder
        yield server


# -- the generic relay: any method, path, headers and body ------------------------------------


async def test_a_post_goes_with_its_body_and_headers_and_the_answer_comes_back_whole(serve, client):
    async def handler(request, reader, writer, conn):
        body = json.dumps({"got": json.loads(request.body)}).encode()
        writer.write(
            raw_response(
                body,
                status=b"201 Created",
                headers=b"content-type: application/json\r\nx-dup: a\r\nx-dup: b\r\n"
                b"keep-alive: timeout=5\r\nconnection: keep-alive, x-hop\r\nx-hop: 1\r\n",
            )
        )

    upstream = await serve(handler)
    vllm = await client(upstream, api_key="sk-vllm")
    payload = {"model": "m", "prompt": "hi ü"}
    answer = await vllm.open(
        "POST",
        "/v1/completions?x=1",
        [
            (b"Content-Type", b"application/json"),
            (b"host", b"gateway.example"),
            (b"connection", b"keep-alive"),
            (b"te", b"trailers"),
            (b"authorization", b"Bearer caller-key"),
            (b"content-length", b"999"),
            (b"x-custom", b"kept"),
        ],
        json.dumps(payload).encode(),
        "r-7",
    )
    assert answer.status == 201
    assert json.loads(await answer.read()) == {"got": payload}
    assert answer.header(b"content-type") == "application/json"
    assert [v for k, v in answer.headers if k == b"x-dup"] == [b"a", b"b"]
    names = {k for k, _ in answer.headers}
    assert not names & {b"connection", b"keep-alive", b"x-hop"}  # hop-by-hop, named or not
    (sent,) = upstream.requests
    assert (sent.method, sent.target) == (b"POST", b"/v1/completions?x=1")
    assert json.loads(sent.body) == payload
    assert sent.header(b"host") == f"127.0.0.1:{upstream.port}".encode()
    assert sent.header(b"content-length") == str(len(sent.body)).encode()
    assert sent.header(b"authorization") == b"Bearer sk-vllm"  # vLLM's key, not the caller's
    assert sent.header(b"x-request-id") == b"r-7"
    assert sent.header(b"content-type") == b"application/json"
    assert sent.header(b"x-custom") == b"kept"
    assert sent.header(b"te") is None
    assert sent.header(b"accept-encoding") == b"identity"


async def test_a_streamed_request_body_is_sent_as_it_comes_chunked_or_with_its_length(
    serve, client
):
    async def echo_body(request, reader, writer, conn):
        writer.write(raw_response(request.body))

    async def parts():
        yield b"streamed "
        yield b"body"

    upstream = await serve(echo_body)
    vllm = await client(upstream)
    chunked = await vllm.open("POST", "/v1/audio/transcriptions", [], parts())
    assert await chunked.read() == b"streamed body"
    length = [(b"content-length", b"13"), (b"content-type", b"multipart/form-data; boundary=x")]
    sized = await vllm.open("POST", "/v1/audio/transcriptions", length, parts())
    assert await sized.read() == b"streamed body"
    first, second = upstream.requests
    assert first.header(b"transfer-encoding") == b"chunked"
    assert (second.header(b"content-length"), second.header(b"transfer-encoding")) == (b"13", None)
    assert second.header(b"content-type") == b"multipart/form-data; boundary=x"


async def test_an_answer_is_read_chunk_by_chunk_as_it_comes(serve, client):
    # Each event is written only once the client has what came before: any buffering on the
    # way would deadlock, and the client's waits time out.
    head_received, first_received = asyncio.Event(), asyncio.Event()

    async def handler(request, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(head_received.wait(), 1.5)
        await asyncio.sleep(0.01)  # let the client wait for the event
        writer.write(raw_chunk(b"data: 1\n\n"))
        await writer.drain()
        await asyncio.wait_for(first_received.wait(), 1.5)
        await asyncio.sleep(0.01)
        writer.write(raw_chunk(b"data: 2\n\n"))
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    vllm = await client(await serve(handler))
    answer = await vllm.open("POST", "/v1/completions", [], b'{"stream": true}')
    head_received.set()
    chunks = aiter(answer)
    assert await asyncio.wait_for(anext(chunks), 1) == b"data: 1\n\n"
    first_received.set()
    assert await asyncio.wait_for(anext(chunks), 1) == b"data: 2\n\n"
    assert [c async for c in chunks] == []
    assert answer.header(b"transfer-encoding") == ""
    await answer.aclose()


async def test_a_gzip_answer_is_decoded_and_loses_its_encoding_headers(serve, client):
    async def handler(request, reader, writer, conn):
        if request.target == b"/deflate":
            writer.write(
                raw_response(zlib.compress(b'{"ok": 2}'), headers=b"content-encoding: deflate\r\n")
            )
        else:
            writer.write(
                raw_response(gzip.compress(b'{"ok": 1}'), headers=b"content-encoding: gzip\r\n")
            )

    vllm = await client(await serve(handler))
    answer = await vllm.open("GET", "/gzip")
    assert await answer.read() == b'{"ok": 1}'
    assert answer.header(b"content-encoding") == answer.header(b"content-length") == ""
    assert await (await vllm.open("GET", "/deflate")).read() == b'{"ok": 2}'


async def test_a_gzip_event_stream_is_decoded_event_by_event(serve, client):
    async def handler(request, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        writer.write(b"content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n")
        compressor = zlib.compressobj(wbits=31)
        for i in range(3):
            data = compressor.compress(b"data: %d\n\n" % i) + compressor.flush(zlib.Z_SYNC_FLUSH)
            writer.write(raw_chunk(data))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(raw_chunk(compressor.flush()) + b"0\r\n\r\n")

    vllm = await client(await serve(handler))
    answer = await vllm.open("POST", "/v1/completions", [], b"{}")
    assert [chunk async for chunk in answer] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (b"content-encoding: xz\r\n", "content coding tide-vllm cannot decode: xz"),
        (b"content-encoding: gzip\r\n", "cannot be decoded"),  # a body that is not gzip
        (b"transfer-encoding: gzip, chunked\r\n", "transfer coding"),
    ],
)
async def test_a_body_that_cannot_be_decoded_is_refused_as_a_bad_answer(
    headers, message, serve, client
):
    async def handler(request, reader, writer, conn):
        if b"transfer-encoding" in headers:
            writer.write(b"HTTP/1.1 200 OK\r\n%s\r\n%s0\r\n\r\n" % (headers, raw_chunk(b"abc")))
        else:
            writer.write(raw_response(b"not compressed", headers=headers))

    vllm = await client(await serve(handler))
    with pytest.raises(EngineFailed, match=message) as info:
        await (await vllm.open("GET", "/")).read()
    assert info.value.status == 502


async def test_head_and_get_of_the_fake_vllm(fake_vllm):
    vllm = VLLMClient(fake_vllm.url, timeout=2.0)
    try:
        got = await vllm.open("GET", "/v1/models")
        assert got.status == 200 and got.header(b"content-type") == "application/json"
        assert [m["id"] for m in json.loads(await got.read())["data"]] == [MODEL]
        head = await vllm.open("HEAD", "/v1/models")
        assert head.status == 200 and int(head.header(b"content-length")) > 0
        assert await head.read() == b""
        missing = await vllm.open("GET", "/nope")
        assert missing.status == 404
        await missing.aclose()
    finally:
        await vllm.aclose()


async def test_a_stream_of_the_fake_vllm_comes_as_it_is_made_and_closing_it_aborts_it(fake_vllm):
    vllm = VLLMClient(fake_vllm.url, timeout=2.0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "slow"}], "stream": True}
    fake_vllm.recorder.clear()
    try:
        answer = await vllm.open(
            "POST",
            "/v1/chat/completions",
            [(b"content-type", b"application/json")],
            json.dumps(body).encode(),
            "r-stream",
        )
        assert answer.header(b"content-type").startswith("text/event-stream")
        arrivals, text = [], b""
        async for chunk in answer:  # 100 chunks 50 ms apart: each comes when it is made
            arrivals.append(time.monotonic())
            text += chunk
            if text.count(b"data: ") >= 6:
                break
        assert arrivals[-1] - arrivals[0] > 0.15
        await answer.aclose()  # the caller left: vLLM must see the connection close
        left = time.monotonic()
        while not fake_vllm.recorder.abandoned and time.monotonic() < left + 2:
            await asyncio.sleep(0.01)
    finally:
        await vllm.aclose()
    assert fake_vllm.recorder.abandoned and fake_vllm.recorder.abandoned[0] - left < 1.0
    assert fake_vllm.recorder.headers[-1]["x-request-id"] == "r-stream"


async def test_the_chat_request_is_written_as_vllm_expects(serve, client):
    async def handler(request, reader, writer, conn):
        writer.write(raw_response(b'{"ok": true}', headers=b"content-type: application/json\r\n"))

    upstream = await serve(handler)
    vllm = await client(upstream, api_key="sk-1")
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi ü"}]}
    answer = await vllm.open_chat(payload, "r-9")
    assert (answer.status, answer.header(b"content-type"), await answer.read()) == (
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


async def test_a_header_with_a_line_break_is_refused_before_sending(serve, client):
    upstream = await serve()
    vllm = await client(upstream)
    with pytest.raises(ValueError):
        await vllm.open("GET", "/", [(b"x-id", b"a\r\nx-injected: 1")])
    with pytest.raises(ValueError):
        await vllm.open_chat({}, "r\r\nx-evil: 1")
    assert await (await vllm.open("GET", "/ok")).read() == b"/ok"
    assert [r.target for r in upstream.requests] == [b"/ok"]


def test_an_api_key_with_a_line_break_is_refused():
    with pytest.raises(ValueError, match="CR or LF"):
        VLLMClient("http://127.0.0.1:1", timeout=1.0, api_key="sk\r\nx-evil: 1")


# -- bodies of every framing -----------------------------------------------------------------


async def test_a_body_ending_with_the_connection_is_read_to_the_end(serve, client):
    async def handler(request, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart 1, ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"part 2")
        return False

    vllm = await client(await serve(handler))
    assert await (await vllm.open("GET", "/")).read() == b"part 1, part 2"


async def test_a_large_body_read_slowly_arrives_whole(serve, client):
    blob = bytes(range(256)) * 4096 * 4  # 4 MiB: more than is buffered before reading pauses

    async def handler(request, reader, writer, conn):
        writer.write(raw_response(blob))

    vllm = await client(await serve(handler))
    got = bytearray()
    async for part in await vllm.open("GET", "/"):
        got += part
        await asyncio.sleep(0.001)
    assert got == blob


async def test_an_interim_100_answer_is_skipped(serve, client):
    async def handler(request, reader, writer, conn):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + raw_response(b"final"))

    vllm = await client(await serve(handler))
    answer = await vllm.open("GET", "/")
    assert (answer.status, await answer.read()) == (200, b"final")


async def test_trailers_do_not_join_the_headers(serve, client):
    async def handler(request, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-t\r\n\r\n")
        writer.write(raw_chunk(b"hello") + b"0\r\nx-t: 1\r\n\r\n")

    vllm = await client(await serve(handler))
    answer = await vllm.open("GET", "/")
    assert await answer.read() == b"hello"
    assert answer.header(b"x-t") == answer.header(b"trailer") == ""


# -- connections: reuse, limits, closing -----------------------------------------------------


async def test_sequential_requests_share_one_keep_alive_connection(serve, client):
    upstream = await serve()
    vllm = await client(upstream)
    for i in range(20):
        assert await (await vllm.open("GET", f"/{i}")).read() == f"/{i}".encode()
    assert upstream.accepts == 1


async def test_connection_close_from_the_server_makes_the_next_request_open_a_new_one(
    serve, client
):
    async def handler(request, reader, writer, conn):
        # Announces the close but leaves the connection open: only the client can honour it.
        writer.write(raw_response(request.target, headers=b"connection: close\r\n"))

    upstream = await serve(handler)
    vllm = await client(upstream)
    assert await (await vllm.open("GET", "/a")).read() == b"/a"
    assert await (await vllm.open("GET", "/b")).read() == b"/b"
    assert [conn.requests for conn in upstream.conns] == [1, 1]
    await asyncio.wait_for(upstream.conns[0].client_closed.wait(), 1)


async def test_an_idle_connection_the_server_closed_is_not_a_failure(serve, client):
    async def handler(request, reader, writer, conn):
        writer.write(raw_response(request.target))
        asyncio.get_running_loop().call_later(0.05, writer.close)

    upstream = await serve(handler)
    vllm = await client(upstream)
    assert await (await vllm.open_chat({}, "r-1")).read() == b"/v1/chat/completions"
    await asyncio.sleep(0.15)
    assert await (await vllm.open_chat({}, "r-2")).read() == b"/v1/chat/completions"
    assert upstream.accepts == 2


async def test_the_pool_holds_at_most_pool_size_connections(serve, client):
    upstream = await serve()
    vllm = await client(upstream, pool_size=20)

    async def one(i: int) -> bytes:
        return await (await vllm.open("GET", f"/{i}")).read()

    bodies = await asyncio.gather(*(one(i) for i in range(300)))
    assert bodies == [f"/{i}".encode() for i in range(300)]
    assert upstream.accepts <= 20


async def test_a_waiting_request_gets_the_connection_a_finished_one_frees(serve, client):
    release = asyncio.Event()

    async def handler(request, reader, writer, conn):
        if request.target == b"/slow":
            await release.wait()
        writer.write(raw_response(request.target))

    upstream = await serve(handler)
    vllm = await client(upstream, pool_size=1)
    slow = asyncio.create_task(vllm.open("GET", "/slow"))
    await asyncio.wait_for(upstream.got_request.wait(), 1)
    waiting = asyncio.create_task(vllm.open("GET", "/waiting"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    release.set()
    assert await (await slow).read() == b"/slow"
    assert await (await waiting).read() == b"/waiting"
    assert upstream.accepts == 1


async def test_closing_a_half_read_answer_closes_its_connection(serve, client):
    async def handler(request, reader, writer, conn):
        if request.target == b"/stream":
            writer.write(CHUNKED_HEAD + raw_chunk(b"token 1 "))  # and never more
        else:
            writer.write(raw_response(request.target))

    upstream = await serve(handler)
    vllm = await client(upstream)
    answer = await vllm.open("POST", "/stream")
    assert await anext(aiter(answer)) == b"token 1 "
    await answer.aclose()
    await asyncio.wait_for(upstream.conns[0].client_closed.wait(), 1)
    assert await (await vllm.open("GET", "/next")).read() == b"/next"
    assert upstream.accepts == 2


async def test_cancelling_while_waiting_for_the_head_closes_the_connection_and_frees_it(
    serve, client
):
    async def handler(request, reader, writer, conn):
        if request.target != b"/hang":
            writer.write(raw_response(request.target))

    upstream = await serve(handler)
    vllm = await client(upstream, pool_size=1)
    task = asyncio.create_task(vllm.open("POST", "/hang"))
    await asyncio.wait_for(upstream.got_request.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(upstream.conns[0].client_closed.wait(), 1)
    assert await (await vllm.open("GET", "/ok")).read() == b"/ok"


async def test_closing_the_client_closes_its_connections(serve):
    upstream = await serve()
    vllm = VLLMClient(upstream.url, timeout=1.0)
    assert await (await vllm.open("GET", "/a")).read() == b"/a"
    await vllm.aclose()
    await asyncio.wait_for(upstream.client_closed.wait(), 1)


# -- at most once: a request vLLM may have received is not sent again ------------------------


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
async def test_a_request_whose_connection_closes_before_the_answer_is_not_sent_again(
    method, serve, client
):
    async def handler(request, reader, writer, conn):
        if request.target == b"/dies":
            return False  # read it, then close without answering: vLLM died working on it
        writer.write(raw_response(request.target))

    upstream = await serve(handler)
    vllm = await client(upstream)
    assert await (await vllm.open(method, "/first")).read() == b"/first"  # keep-alive now
    with pytest.raises(EngineUnavailable, match="lost the connection"):
        await vllm.open(method, "/dies")
    assert [r.target for r in upstream.requests] == [b"/first", b"/dies"]
    with pytest.raises(EngineUnavailable, match="lost the connection"):
        await vllm.open(method, "/dies")  # on a new connection as well
    assert [r.target for r in upstream.requests] == [b"/first", b"/dies", b"/dies"]


async def test_a_connection_closed_after_part_of_the_answer_is_not_retried(serve, client):
    async def handler(request, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\n")
        return False

    upstream = await serve(handler)
    vllm = await client(upstream)
    with pytest.raises(EngineUnavailable, match="lost the connection"):
        await vllm.open("GET", "/")
    assert len(upstream.requests) == 1


class FirstRefused(AbstractResolver):
    """DNS for the test: the first look-up names a port nobody listens on, the others the
    upstream's, so the first connection is refused and the next one is accepted."""

    def __init__(self, dead_port: int, live_port: int) -> None:
        self.ports = [dead_port, live_port]
        self.calls = 0

    async def resolve(self, host, port=0, family=socket.AF_INET) -> list[ResolveResult]:
        self.calls += 1
        port = self.ports[min(self.calls, 2) - 1]
        return [
            ResolveResult(
                hostname=host, host="127.0.0.1", port=port,
                family=socket.AF_INET, proto=0, flags=socket.AI_NUMERICHOST,
            )
        ]  # fmt: skip

    async def close(self) -> None:
        pass


async def test_a_failure_to_connect_is_tried_again_once_on_a_new_connection(serve):
    upstream = await serve()
    with socket.socket() as dead:  # bound, not listening: a connection to it is refused
        dead.bind(("127.0.0.1", 0))
        resolver = FirstRefused(dead.getsockname()[1], upstream.port)

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
            return aiohttp.ClientSession(connector=connector)

        transport = AiohttpTransport(client=session)
        vllm = VLLMClient(f"http://vllm.test:{upstream.port}", 1.0, transport=transport)
        try:
            answer = await vllm.open_chat({"model": "m"}, "r-1")
            assert await answer.read() == b"/v1/chat/completions"
        finally:
            await vllm.aclose()
    assert resolver.calls == 2  # refused, then connected
    assert len(upstream.requests) == 1


async def test_a_refused_connection_is_unavailable_after_a_second_try():
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        vllm = VLLMClient(f"http://127.0.0.1:{dead.getsockname()[1]}", timeout=1.0)
        try:
            with pytest.raises(EngineUnavailable, match="cannot reach vLLM"):
                await vllm.open_chat({}, "r-1")
        finally:
            await vllm.aclose()


# -- timeouts and broken answers --------------------------------------------------------------


async def test_no_answer_head_in_time_is_a_timeout_and_the_connection_is_closed(serve, client):
    async def silent(request, reader, writer, conn):
        pass  # never answers

    upstream = await serve(silent)
    vllm = await client(upstream, timeout=30.0)
    started = time.monotonic()
    with pytest.raises(EngineTimeout):
        await vllm.open("GET", "/", timeout=0.1)  # a probe's own, shorter timeout
    assert time.monotonic() - started < 1.0
    await asyncio.wait_for(upstream.client_closed.wait(), 1)


async def test_a_pause_between_body_chunks_longer_than_the_timeout_is_a_timeout(serve, client):
    async def handler(request, reader, writer, conn):
        writer.write(CHUNKED_HEAD + raw_chunk(b"first"))  # then silence

    vllm = await client(await serve(handler), timeout=0.2)
    chunks = aiter(await vllm.open("GET", "/"))
    assert await anext(chunks) == b"first"
    with pytest.raises(EngineTimeout, match="0.2s"):
        await anext(chunks)


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_the_server_closing_mid_body_is_a_lost_connection(how, serve, client):
    async def handler(request, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(0.05)
        if how == "rst":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        return False

    vllm = await client(await serve(handler))
    answer = await vllm.open("GET", "/")
    with pytest.raises(EngineUnavailable, match="lost the connection"):
        await answer.read()


async def test_a_chunked_body_cut_off_is_an_error_even_with_its_header_on_two_lines(serve, client):
    async def handler(request, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n" + raw_chunk(b"hello"))
        await writer.drain()
        return False  # the connection closes before the last chunk

    vllm = await client(await serve(handler))
    answer = await vllm.open("GET", "/")
    chunks = aiter(answer)
    assert await anext(chunks) == b"hello"
    with pytest.raises(EngineUnavailable, match="lost the connection"):
        await anext(chunks)


@pytest.mark.parametrize(
    "garbage",
    [
        b"SPDY/9 nonsense\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: 1\r\n" % i for i in range(1000)) + b"\r\n",
    ],
    ids=["not-http", "bad-length", "too-many-headers"],
)
async def test_a_malformed_answer_is_a_bad_answer(garbage, serve, client):
    async def handler(request, reader, writer, conn):
        writer.write(garbage)

    vllm = await client(await serve(handler))
    with pytest.raises(EngineFailed, match="not valid HTTP") as info:
        await vllm.open("GET", "/")
    assert info.value.status == 502


async def test_an_answer_head_of_many_megabytes_is_refused_without_reading_it_all(serve, client):
    sent = 0

    async def handler(request, reader, writer, conn):
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nx-big: ")
        try:
            for _ in range(300):  # up to 300 MB, unless the client gives up
                writer.write(b"a" * 1_000_000)
                await writer.drain()
                sent += 1
        except ConnectionError:
            return False
        writer.write(b"\r\ncontent-length: 0\r\n\r\n")

    vllm = await client(await serve(handler), timeout=5.0)
    started = time.monotonic()
    with pytest.raises(EngineFailed, match="not valid HTTP"):
        await vllm.open("GET", "/")
    assert time.monotonic() - started < 2.0
    await asyncio.sleep(0.1)
    assert sent < 20  # megabytes written before the client closed the connection
