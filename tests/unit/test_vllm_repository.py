import asyncio
import gzip
import json
import time
import zlib

import httpx
import pytest
import respx

from tests.fakes.upstream import RawUpstream, raw_chunk, raw_response
from tide_vllm.domain.chat.entity import (
    EngineFailed,
    EngineRejected,
    EngineState,
    EngineTimeout,
    EngineUnavailable,
    OpenAIChat,
)
from tide_vllm.domain.chat.factory import ChatDefaults, ChatFactory
from tide_vllm.infrastructure.vllm.vllm_client import VLLMClient
from tide_vllm.infrastructure.vllm.vllm_repository import VLLMChatRepository, VLLMEngineProbe
from web.modules.tidevllm.errors import status_of

BASE = "http://vllm.test:8000"
CHAT = ChatFactory(ChatDefaults("qwen", "sys", 64, 0.7, 0.9)).from_prompt("hi", request_id="r-1")

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "qwen",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!"},
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
}


@pytest.fixture
async def client():
    # httpx's own transport, which respx intercepts (the default is httpx-aiohttp's).
    c = VLLMClient(BASE, timeout=0.5, transport=httpx.AsyncHTTPTransport())
    yield c
    await c.aclose()


@respx.mock
async def test_the_chat_is_sent_as_an_openai_request_and_vllms_answer_is_read(client):
    route = respx.post(f"{BASE}/v1/chat/completions").respond(200, json=COMPLETION)
    result = await VLLMChatRepository(client).complete(CHAT)
    sent = route.calls.last.request
    assert sent.headers["x-request-id"] == "r-1"
    import json

    assert json.loads(sent.content) == {
        "model": "qwen",
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}],
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    assert (result.content, result.finish_reason, result.model) == ("Hello!", "length", "qwen")
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (11, 14)
    assert result.request_id == "r-1"


@respx.mock
async def test_vllms_own_4xx_is_relayed_with_its_message_and_param(client):
    respx.post(f"{BASE}/v1/chat/completions").respond(
        400,
        json={
            "error": {
                "message": "max_tokens is too large",
                "type": "BadRequestError",
                "param": "max_tokens",
                "code": 400,
            }
        },
    )
    with pytest.raises(EngineRejected) as info:
        await VLLMChatRepository(client).complete(CHAT)
    assert (info.value.status, info.value.param) == (400, "max_tokens")
    assert info.value.message == "max_tokens is too large"


@respx.mock
async def test_a_vllm_server_error_keeps_its_status(client):
    respx.post(f"{BASE}/v1/chat/completions").respond(500, json={"error": {"message": "boom"}})
    with pytest.raises(EngineFailed) as info:
        await VLLMChatRepository(client).complete(CHAT)
    assert info.value.status == 500
    assert "boom" in info.value.message


@respx.mock
async def test_a_body_that_is_not_json_is_a_502(client):
    respx.post(f"{BASE}/v1/chat/completions").respond(200, text="<html>proxy</html>")
    with pytest.raises(EngineFailed) as info:
        await VLLMChatRepository(client).complete(CHAT)
    assert info.value.status == 502


@respx.mock
async def test_an_unreachable_vllm_is_unavailable(client):
    respx.post(f"{BASE}/v1/chat/completions").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(EngineUnavailable, match="cannot reach vLLM"):
        await VLLMChatRepository(client).complete(CHAT)


@respx.mock
async def test_no_answer_within_the_timeout_is_a_timeout(client):
    respx.post(f"{BASE}/v1/chat/completions").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(EngineTimeout, match="0.5s"):
        await VLLMChatRepository(client).complete(CHAT)


@respx.mock
async def test_the_probe_is_healthy_only_when_the_model_is_listed(client):
    route = respx.get(f"{BASE}/v1/models")
    route.respond(200, json={"object": "list", "data": [{"id": "qwen"}]})
    probe = VLLMEngineProbe(client, "qwen")
    status = await probe.check()
    assert status.healthy and status.state is EngineState.EXTERNAL
    assert probe.current() == status

    route.respond(200, json={"object": "list", "data": [{"id": "other"}]})
    status = await probe.check()
    assert not status.healthy and "does not serve 'qwen'" in status.detail

    route.mock(side_effect=httpx.ConnectError("refused"))
    status = await probe.check()
    assert not status.healthy and "unreachable" in status.detail


@respx.mock
async def test_a_chunk_holding_several_events_loses_none_of_them(client):
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Par"}}]},
        {"choices": [{"index": 0, "delta": {"content": "is"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
    ]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    respx.post(f"{BASE}/v1/chat/completions").respond(
        200, text=body, headers={"content-type": "text/event-stream"}
    )
    batches = [b async for b in VLLMChatRepository(client).stream(CHAT)]
    accepted, deltas = batches  # vLLM accepted the request, then the events came together
    assert accepted == []
    assert [d.content for d in deltas] == ["Par", "is", ""]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is not None and deltas[-1].usage.total_tokens == 6


@respx.mock
async def test_a_stream_that_ends_without_done_keeps_its_last_event_and_its_finish(client):
    events = [
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "length"}]},
    ]
    body = f"data: {json.dumps(events[0])}\n\ndata: {json.dumps(events[1])}"  # no blank line
    respx.post(f"{BASE}/v1/chat/completions").respond(
        200, text=body, headers={"content-type": "text/event-stream"}
    )
    batches = [b async for b in VLLMChatRepository(client).stream(CHAT)]
    deltas = [d for batch in batches for d in batch]
    assert [d.content for d in deltas] == ["Hel", "lo", ""]  # nothing lost
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage is None


# -- against a raw HTTP/1.1 upstream: what vLLM (or what is in front of it) may do --------------

OPENAI = OpenAIChat(
    request_id="r-2",
    model="qwen",
    stream=True,
    payload={"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "stream": True},
)
EVENTS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "Par"}}]},
    {"choices": [{"index": 0, "delta": {"content": "is"}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
]
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"


def sse(event) -> bytes:
    return b"data: " + (json.dumps(event).encode() if event != "[DONE]" else b"[DONE]") + b"\n\n"


@pytest.fixture
async def raw_vllm():
    """A VLLMClient in front of a RawUpstream answering with `handler`."""
    opened: list[tuple[RawUpstream, VLLMClient]] = []

    async def start(handler, timeout: float = 2.0) -> tuple[RawUpstream, VLLMChatRepository]:
        upstream = await RawUpstream(handler).start()
        opened.append((upstream, VLLMClient(upstream.url, timeout=timeout)))
        return upstream, VLLMChatRepository(opened[-1][1])

    yield start
    for upstream, client in opened:
        await client.aclose()
        await upstream.close()


async def run(repository: VLLMChatRepository, shape: str) -> list:
    """The chat in one of the four ways the web layer asks for it."""
    if shape == "tide":
        return [await repository.complete(CHAT)]
    if shape == "tide-stream":
        return [batch async for batch in repository.stream(CHAT)]
    if shape == "openai":
        return [await repository.relay(OPENAI)]
    return [block async for block in repository.relay_stream(OPENAI)]


SHAPES = ["tide", "tide-stream", "openai", "openai-stream"]


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_chat_that_vllm_dies_on_is_not_sent_again_and_is_an_engine_error(shape, raw_vllm):
    async def dies(request, reader, writer, conn):
        if conn.requests == 1:  # the first on each connection gets an answer
            writer.write(raw_response(b"{}", headers=b"content-type: application/json\r\n"))
            return None
        return False  # read it, count it, close without answering: vLLM died working on it

    upstream, repository = await raw_vllm(dies)
    assert await repository.models() == b"{}"  # a keep-alive connection is pooled now
    with pytest.raises(EngineUnavailable, match="lost the connection") as info:
        await run(repository, shape)
    assert [r.target for r in upstream.requests].count(b"/v1/chat/completions") == 1
    assert status_of(info.value) == 503  # what the caller gets; vLLM ran it at most once


@pytest.mark.parametrize("shape", SHAPES)
async def test_an_answer_head_of_several_megabytes_is_a_bad_answer(shape, raw_vllm):
    async def huge_head(request, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\nx-big: ")
        try:
            for _ in range(50):  # 50 MB, unless the client gives up first
                writer.write(b"a" * 1_000_000)
                await writer.drain()
        except ConnectionError:
            return False
        writer.write(b"\r\n\r\n")

    _, repository = await raw_vllm(huge_head)
    started = time.monotonic()
    with pytest.raises(EngineFailed, match="not valid HTTP") as info:
        await run(repository, shape)
    assert status_of(info.value) == 502
    assert time.monotonic() - started < 2.0


async def gzip_events(request, reader, writer, conn):
    """vLLM's events for the chat, gzip-encoded (as a compressing proxy would send them),
    each flushed as it is made."""
    writer.write(SSE_HEAD + b"content-encoding: gzip\r\n\r\n")
    compressor = zlib.compressobj(wbits=31)
    for event in [*EVENTS, "[DONE]"]:
        data = compressor.compress(sse(event)) + compressor.flush(zlib.Z_SYNC_FLUSH)
        writer.write(raw_chunk(data))
        await writer.drain()
        await asyncio.sleep(0.005)
    writer.write(raw_chunk(compressor.flush()) + b"0\r\n\r\n")


async def test_a_gzip_event_stream_is_relayed_decoded_in_the_openai_shape(raw_vllm):
    _, repository = await raw_vllm(gzip_events)
    blocks = [block async for block in repository.relay_stream(OPENAI)]
    assert blocks[0] == b""
    assert b"".join(blocks) == b"".join(sse(e) for e in [*EVENTS, "[DONE]"])


async def test_a_gzip_event_stream_is_read_decoded_in_the_tide_shape(raw_vllm):
    _, repository = await raw_vllm(gzip_events)
    deltas = [d async for batch in repository.stream(CHAT) for d in batch]
    assert "".join(d.content for d in deltas) == "Paris"
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is not None and deltas[-1].usage.total_tokens == 6


async def test_a_gzip_completion_is_decoded(raw_vllm):
    async def gzipped(request, reader, writer, conn):
        body = gzip.compress(json.dumps(COMPLETION).encode())
        headers = b"content-type: application/json\r\ncontent-encoding: gzip\r\n"
        writer.write(raw_response(body, headers=headers))

    _, repository = await raw_vllm(gzipped)
    assert (await repository.complete(CHAT)).content == "Hello!"
    assert json.loads(await repository.relay(OPENAI)) == COMPLETION


@pytest.mark.parametrize("shape", ["tide-stream", "openai-stream"])
async def test_a_stream_cut_off_is_a_lost_connection_not_a_complete_answer(shape, raw_vllm):
    async def cut_off(request, reader, writer, conn):
        # Transfer-Encoding on two lines, the body ends with the connection before its last
        # chunk: neither makes the events so far a whole answer.
        writer.write(SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n")
        writer.write(raw_chunk(sse(EVENTS[1])))
        await writer.drain()
        await asyncio.sleep(0.01)
        return False

    _, repository = await raw_vllm(cut_off)
    with pytest.raises(EngineUnavailable, match="lost the connection"):
        await run(repository, shape)


@pytest.mark.parametrize("shape", ["tide", "openai"])
async def test_a_completion_cut_off_is_a_lost_connection(shape, raw_vllm):
    async def cut_off(request, reader, writer, conn):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        writer.write(b"content-length: 500\r\n\r\n" + json.dumps(COMPLETION).encode()[:50])
        await writer.drain()
        return False

    _, repository = await raw_vllm(cut_off)
    with pytest.raises(EngineUnavailable, match="lost the connection"):
        await run(repository, shape)


async def test_the_models_and_the_metrics_are_relayed_and_vllms_errors_kept(raw_vllm):
    async def handler(request, reader, writer, conn):
        if request.target == b"/v1/models":
            writer.write(
                raw_response(b'{"data": []}', headers=b"content-type: application/json\r\n")
            )
        else:
            writer.write(raw_response(b'{"error": {"message": "no metrics"}}', b"500 Oops"))

    _, repository = await raw_vllm(handler)
    assert await repository.models() == b'{"data": []}'
    with pytest.raises(EngineFailed, match="no metrics") as info:
        await repository.engine_metrics()
    assert info.value.status == 500
