import json

import httpx
import pytest
import respx

from tide_vllm.domain.chat.entity import (
    EngineFailed,
    EngineRejected,
    EngineState,
    EngineTimeout,
    EngineUnavailable,
)
from tide_vllm.domain.chat.factory import ChatDefaults, ChatFactory
from tide_vllm.infrastructure.vllm.vllm_client import VLLMClient
from tide_vllm.infrastructure.vllm.vllm_repository import VLLMChatRepository, VLLMEngineProbe

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
    # httpx's own transport, which respx intercepts (the default is Http11Transport).
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
