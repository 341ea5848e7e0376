import uuid

import httpx
import pytest

from tide_vllm.domain.chat.entity import EngineState, EngineStatus

from .conftest import MODEL

PATHS = ["/chat/completions", "/v1/chat/completions"]
RESPONSE_KEYS = {"request_id", "content", "model", "usage", "finish_reason", "error"}


async def test_health_is_200_with_the_spec_shape_when_vllm_is_ready(harness):
    r = await harness.http.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "healthy"
    assert r.json()["vllm_healthy"] is True


async def test_health_is_503_and_says_why_while_vllm_starts(harness):
    harness.monitor.status = EngineStatus(EngineState.STARTING, False, "vLLM is starting (12s)")
    r = await harness.http.get("/health")
    assert r.status_code == 503
    assert r.json() == {
        "status": "vLLM is starting (12s)",
        "vllm_healthy": False,
        "vllm_state": "starting",
        "engines": [
            {
                "name": "default",
                "model": "Qwen2.5-7B-Instruct",
                "state": "starting",
                "healthy": False,
                "detail": "vLLM is starting (12s)",
            }
        ],
    }


@pytest.mark.parametrize("path", PATHS)
async def test_a_prompt_gets_the_spec_response_with_defaults_applied(harness, path):
    r = await harness.http.post(path, json={"prompt": "What is the capital of France?"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == RESPONSE_KEYS
    assert body["content"] == "Paris." and body["error"] is None
    assert body["model"] == MODEL and body["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}
    assert uuid.UUID(body["request_id"]).version == 4
    sent = harness.upstream.received[-1]
    assert sent["messages"][0] == {"role": "system", "content": "你是一个有用的AI助手。"}
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (2048, 0.7, 0.9)
    assert harness.upstream.headers[-1]["x-request-id"] == body["request_id"]


async def test_the_callers_request_id_and_parameters_are_used(harness):
    r = await harness.http.post(
        "/chat/completions",
        json={
            "prompt": "hi",
            "system_prompt": "be brief",
            "request_id": "req-42",
            "max_tokens": 8,
            "temperature": 0,
            "top_p": 1,
        },
    )
    assert r.status_code == 200 and r.json()["request_id"] == "req-42"
    sent = harness.upstream.received[-1]
    assert sent["messages"][0]["content"] == "be brief"
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (8, 0, 1)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "hi", "temperature": 5}, "temperature"),
        ({"prompt": "hi", "top_p": 2}, "top_p"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "system_prompt": ["x"]}, "system_prompt"),
        ({"prompt": "hi", "max_tokenz": 5}, "max_tokenz"),
    ],
)
@pytest.mark.parametrize("path", PATHS)
async def test_bad_input_is_a_400_naming_the_field_in_the_spec_shape(harness, path, body, field):
    r = await harness.http.post(path, json=body)
    assert r.status_code == 400
    got = r.json()
    assert set(got) == RESPONSE_KEYS
    assert got["error"].startswith(f"{field}:")
    assert got["content"] == ""
    assert harness.upstream.received == []


async def test_an_error_echoes_the_callers_request_id(harness):
    r = await harness.http.post("/chat/completions", json={"prompt": "", "request_id": "r-7"})
    assert r.status_code == 400 and r.json()["request_id"] == "r-7"


BAD_BODIES = pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "JSON object"),
        (b'{"prompt": "\xff"}', "UTF-8"),
        (b'{"prompt": "hi", "temperature": NaN}', "invalid JSON"),
        (b"[" * 5000 + b"]" * 5000, "invalid JSON"),
    ],
)


@BAD_BODIES
async def test_a_body_that_is_not_a_json_object_is_a_400_in_the_spec_shape(harness, raw, words):
    r = await harness.http.post(
        "/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"].startswith("body:") and words in r.json()["error"]
    assert uuid.UUID(r.json()["request_id"])


@BAD_BODIES
async def test_a_body_that_is_not_a_json_object_is_a_400_in_openai_shape_on_v1(harness, raw, words):
    r = await harness.http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert words in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "body"
    assert r.json()["error"]["type"] == "BadRequestError"


async def test_while_vllm_is_not_ready_a_chat_is_a_503_at_once(harness):
    harness.monitor.status = EngineStatus(EngineState.STARTING, False, "vLLM is starting (3s)")
    r = await harness.http.post("/chat/completions", json={"prompt": "hi", "request_id": "r"})
    assert r.status_code == 503
    assert r.json()["error"] == "vLLM is starting (3s)"
    assert r.json()["request_id"] == "r"
    assert harness.upstream.received == []


async def test_vllm_unreachable_is_a_503(harness):
    def refuse(body):
        raise httpx.ConnectError("connection refused")

    harness.upstream.behaviour = refuse
    r = await harness.http.post("/chat/completions", json={"prompt": "hi"})
    assert r.status_code == 503
    assert "cannot reach vLLM" in r.json()["error"]


async def test_vllm_too_slow_is_a_504(harness):
    def slow(body):
        raise httpx.ReadTimeout("timed out")

    harness.upstream.behaviour = slow
    r = await harness.http.post("/chat/completions", json={"prompt": "hi"})
    assert r.status_code == 504
    assert "did not answer within 5s" in r.json()["error"]


async def test_vllms_own_4xx_is_relayed_with_its_message(harness):
    harness.upstream.behaviour = lambda body: httpx.Response(
        400,
        json={
            "error": {
                "message": "This model's maximum context length is 4096 tokens.",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
        },
    )
    r = await harness.http.post("/chat/completions", json={"prompt": "hi", "max_tokens": 99999})
    assert r.status_code == 400
    assert r.json()["error"] == "This model's maximum context length is 4096 tokens."


async def test_a_broken_upstream_answer_is_a_502_without_a_traceback(harness):
    harness.upstream.behaviour = lambda body: httpx.Response(200, json={"choices": []})
    r = await harness.http.post("/chat/completions", json={"prompt": "hi"})
    assert r.status_code == 502
    assert "Traceback" not in r.text
    assert "not a chat completion" in r.json()["error"]
    assert (await harness.http.get("/health")).status_code == 200


async def test_a_route_nobody_serves_gets_vllms_404(harness):
    r = await harness.http.get("/nope")
    assert r.status_code == 404
    assert r.json() == {"detail": "Not Found"}  # vLLM's own answer, relayed


@pytest.mark.parametrize("path", PATHS)
async def test_another_method_on_a_chat_path_is_a_405_saying_use_post(harness, path):
    r = await harness.http.get(path)
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    error = r.json()["error"]  # the spec's shape on its path, OpenAI's on /v1
    message = error if path == "/chat/completions" else error["message"]
    assert "GET" in message and "POST" in message
    assert r.headers["x-request-id"]


async def test_the_openapi_schema_documents_both_chat_routes(harness):
    paths = (await harness.http.get("/openapi.json")).json()["paths"]
    for path in PATHS:
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        names = {option.get("title") or option.get("$ref") for option in body["oneOf"]}
        assert names == {"#/components/schemas/TideChatRequest", "OpenAIChatRequest"}


async def test_every_ref_of_the_openapi_document_resolves(harness):
    """Clients generated from /openapi.json need every `$ref` to point inside it."""
    document = (await harness.http.get("/openapi.json")).json()
    refs: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    assert refs and "#/components/schemas/TideChatResponse" in refs
    for ref in refs:
        target = document
        for part in ref.removeprefix("#/").split("/"):
            assert part in target, f"{ref} does not resolve"
            target = target[part]


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b""])
async def test_vllm_answering_200_with_a_body_that_is_not_a_json_object_is_a_502(harness, content):
    harness.upstream.behaviour = lambda body: httpx.Response(
        200, content=content, headers={"content-type": "application/json"}
    )
    r = await harness.http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 502 and "not a JSON object" in r.json()["error"]["message"]
