"""Every other route of vLLM's API through tide-vllm: the official SDK's completions,
responses and embeddings, streams relayed as they come, uploads byte for byte, vLLM's own
answers and errors (its 404 included) unchanged, and what every relayed route gets from the
gateway: keys, request ids, limits, metrics by route, 503 at once, 504, cancellation."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.upstream import MODEL, ServerThread
from tests.helpers import free_port
from tide_vllm.domain.chat.entity import EngineState, EngineStatus
from tide_vllm.domain.chat.factory import ChatDefaults
from tide_vllm.provider.provider import ProviderSettings
from tide_vllm_cmd.app.options.plugin_web_handler import build_app

KEY = "relay-key"
UPSTREAM_KEY = "vllm-key"


class Upstream:
    """A vLLM stand-in for the relayed routes: records each request, answers like vLLM."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.stream_gate = threading.Event()
        self.left = threading.Event()

    def app(self) -> Starlette:
        async def record(request: Request) -> dict[str, Any]:
            entry = {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": dict(request.headers),
                "body": await request.body(),
            }
            self.seen.append(entry)
            return entry

        async def completions(request: Request) -> Response:
            entry = await record(request)
            body = json.loads(entry["body"])
            if body.get("stream"):
                return StreamingResponse(self._events(), media_type="text/event-stream")
            return JSONResponse(
                {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "text": " world", "finish_reason": "stop", "logprobs": None}
                    ],
                    "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
                }
            )

        async def responses(request: Request) -> Response:
            entry = await record(request)
            body = json.loads(entry["body"])
            return JSONResponse(
                {
                    "id": "resp_1",
                    "object": "response",
                    "created_at": 1,
                    "model": body["model"],
                    "status": "completed",
                    "output": [
                        {
                            "type": "message",
                            "id": "msg_1",
                            "role": "assistant",
                            "status": "completed",
                            "content": [{"type": "output_text", "text": "hi", "annotations": []}],
                        }
                    ],
                    "parallel_tool_calls": True,
                    "tool_choice": "auto",
                    "tools": [],
                }
            )

        async def embeddings(request: Request) -> Response:
            await record(request)
            return JSONResponse(
                {
                    "error": {
                        "message": "The model does not support Embeddings API",
                        "type": "BadRequestError",
                        "param": None,
                        "code": 400,
                    }
                },
                status_code=400,
            )

        async def anything(request: Request) -> Response:
            entry = await record(request)
            if request.url.path == "/tokenize":
                return JSONResponse({"tokens": [1, 2], "count": 2, "max_model_len": 4096})
            if request.url.path == "/v1/audio/transcriptions":
                return Response(entry["body"], media_type=request.headers["content-type"])
            if request.url.path == "/slow":
                await asyncio.sleep(5)
                return JSONResponse({})
            return JSONResponse({"detail": "Not Found"}, status_code=404)

        return Starlette(
            routes=[
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/responses", responses, methods=["POST"]),
                Route("/v1/embeddings", embeddings, methods=["POST"]),
                Route("/{path:path}", anything, methods=["GET", "POST", "DELETE"]),
            ]
        )

    async def _events(self):
        try:
            for i in range(3):
                choice = {"index": 0, "text": f"t{i}", "finish_reason": None}
                chunk = {
                    "id": "c",
                    "object": "text_completion",
                    "model": MODEL,
                    "choices": [choice],
                }
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                if i == 0:
                    # The rest waits until the client has seen the first event.
                    while not self.stream_gate.is_set():
                        await asyncio.sleep(0.01)
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.left.set()
            raise


class Monitor:
    def __init__(self) -> None:
        self.status = EngineStatus(EngineState.READY, True, "healthy")

    def current(self) -> EngineStatus:
        return self.status

    async def check(self) -> EngineStatus:
        return self.status


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, ServerThread]]:
    fake = Upstream()
    with ServerThread(fake.app(), free_port()) as server:
        yield fake, server


@pytest.fixture(scope="module")
def monitor() -> Monitor:
    return Monitor()


@pytest.fixture(scope="module")
def tide(upstream, monitor) -> Iterator[ServerThread]:
    settings = ProviderSettings(
        base_url=upstream[1].url,
        timeout=2,
        api_key=UPSTREAM_KEY,
        defaults=ChatDefaults(MODEL, "sys", 64, 0.7, 0.9),
    )
    app = build_app(settings, monitor, api_keys=[KEY], max_body_bytes=64 * 1024)
    with ServerThread(app, free_port()) as server:
        yield server


@pytest.fixture
def fake(upstream) -> Upstream:
    upstream[0].seen.clear()
    return upstream[0]


@pytest.fixture
def client(tide) -> openai.OpenAI:
    return openai.OpenAI(base_url=tide.url + "/v1", api_key=KEY, max_retries=0)


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_sdk_completions_go_through_unchanged(client, fake):
    completion = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, seed=7)
    assert completion.choices[0].text == " world" and completion.usage.total_tokens == 3
    (seen,) = fake.seen
    assert seen["path"] == "/v1/completions"
    assert json.loads(seen["body"]) == {
        "model": MODEL, "prompt": "hello", "max_tokens": 3, "seed": 7
    }  # fmt: skip


def test_sdk_responses_go_through(client, fake):
    response = client.responses.create(model=MODEL, input="hi")
    assert response.output_text == "hi"
    assert fake.seen[0]["path"] == "/v1/responses"


def test_sdk_embeddings_get_vllms_refusal(client, fake):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input="hi")
    assert "does not support Embeddings" in info.value.message
    assert fake.seen[0]["path"] == "/v1/embeddings"


def test_a_stream_is_relayed_event_by_event(tide, fake):
    fake.stream_gate.clear()
    body = {"model": MODEL, "prompt": "hi", "stream": True}
    with httpx.stream("POST", tide.url + "/v1/completions", json=body, headers=AUTH) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] == "t0"
        fake.stream_gate.set()  # only now does the upstream send the rest
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and len(rest) == 3


def test_the_request_id_query_and_vllms_key_reach_vllm(tide, fake):
    r = httpx.post(
        tide.url + "/tokenize?add_special_tokens=false",
        json={"model": MODEL, "prompt": "hi"},
        headers={**AUTH, "X-Request-Id": "rel-1"},
    )
    assert r.status_code == 200 and r.json()["count"] == 2
    assert r.headers["x-request-id"] == "rel-1"
    seen = fake.seen[0]
    assert seen["query"] == "add_special_tokens=false"
    assert seen["headers"]["x-request-id"] == "rel-1"
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_relayed_routes_need_the_key(tide, fake):
    r = httpx.post(tide.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 401 and fake.seen == []


def test_an_upload_goes_through_byte_for_byte(tide, fake):
    files = {"file": ("a.wav", b"RIFF\x00\x01\xff" * 100, "audio/wav")}
    r = httpx.post(
        tide.url + "/v1/audio/transcriptions", files=files, data={"model": MODEL}, headers=AUTH
    )
    assert r.status_code == 200
    seen = fake.seen[0]
    assert seen["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    assert r.content == seen["body"] and b"RIFF\x00\x01\xff" in seen["body"]


def test_a_route_vllm_does_not_serve_gets_vllms_404(tide, fake):
    r = httpx.get(tide.url + "/no/such/route", headers=AUTH)
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    assert fake.seen[0]["path"] == "/no/such/route"


def test_while_vllm_cannot_serve_a_relayed_route_is_a_503_at_once(tide, fake, monitor):
    monitor.status = EngineStatus(EngineState.STARTING, False, "vLLM is starting (12s)")
    try:
        r = httpx.post(tide.url + "/v1/completions", json={}, headers=AUTH)
    finally:
        monitor.status = EngineStatus(EngineState.READY, True, "healthy")
    assert r.status_code == 503 and "starting" in r.json()["error"]["message"]
    assert fake.seen == []


def test_vllm_too_slow_is_a_504(tide, fake):
    started = time.monotonic()
    r = httpx.post(tide.url + "/slow", json={}, headers=AUTH, timeout=10)
    assert r.status_code == 504 and r.json()["error"]["type"]
    assert time.monotonic() - started < 4


def test_a_body_over_the_limit_is_a_413(tide, fake):
    r = httpx.post(tide.url + "/v1/completions", content=b"x" * 70_000, headers=AUTH)
    assert r.status_code == 413 and fake.seen == []


def test_a_client_leaving_a_stream_cancels_it_upstream_within_a_second(tide, fake):
    fake.stream_gate.clear()
    fake.left.clear()
    body = {"model": MODEL, "prompt": "hi", "stream": True}
    with httpx.stream("POST", tide.url + "/v1/completions", json=body, headers=AUTH) as r:
        next(line for line in r.iter_lines() if line)
    left = time.monotonic()
    assert fake.left.wait(3), "the upstream stream was not cancelled"
    assert time.monotonic() - left < 1.0
    fake.stream_gate.set()


def test_relayed_routes_are_counted_by_route(tide, fake):
    httpx.post(tide.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=AUTH)
    httpx.get(tide.url + "/random/123", headers=AUTH)
    text = httpx.get(tide.url + "/metrics", headers=AUTH).text
    assert 'route="/v1/completions"' in text
    assert 'route="/random/123"' not in text and 'route="other"' in text
