"""The real service on the real CPU vLLM and the demo model, spoken to with httpx.

No assertion relies on the words the model chooses: its greedy text changes with the CPU's
numerics. They rely on what tide-vllm controls: shapes, ids, token counts, limits, errors."""

import uuid

import httpx
import pytest

pytestmark = pytest.mark.e2e

SPEC_BODY = {
    "prompt": "What is the capital of France?",
    "system_prompt": "你是一个友好的AI助手",
    "max_tokens": 32,
    "temperature": 0,
}


def test_health_is_healthy(real_service):
    r = httpx.get(real_service.url + "/health")
    assert r.status_code == 200
    assert r.json()["status"] == "healthy" and r.json()["vllm_healthy"] is True


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_the_spec_request_is_answered_in_the_spec_shape(real_service, path):
    r = real_service.http.post(path, json=SPEC_BODY, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"request_id", "content", "model", "usage", "finish_reason", "error"}
    assert isinstance(body["content"], str) and body["content"].strip()
    assert body["model"] == "SmolLM2-135M-Instruct"
    assert body["error"] is None
    assert body["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 32
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert uuid.UUID(body["request_id"]).version == 4


def test_max_tokens_is_honoured_and_the_request_id_echoed(real_service):
    r = real_service.http.post(
        "/chat/completions",
        json={
            "prompt": "Count from one to one hundred.",
            "max_tokens": 3,
            "request_id": "e2e-1",
            "temperature": 0,
        },
        timeout=60,
    )
    assert r.status_code == 200
    assert r.json()["request_id"] == "e2e-1"
    assert r.json()["usage"]["completion_tokens"] == 3
    assert r.json()["finish_reason"] == "length"


def test_vllms_own_rejection_is_relayed(real_service):
    r = real_service.http.post(
        "/chat/completions",
        json={"prompt": "hi", "max_tokens": 100000},
        timeout=60,
    )
    assert r.status_code == 400
    assert r.json()["error"] and "Traceback" not in r.text


def test_bad_input_is_a_400_and_the_service_stays_up(real_service):
    r = real_service.http.post("/chat/completions", json={"prompt": ""})
    assert r.status_code == 400 and r.json()["error"].startswith("prompt:")
    assert httpx.get(real_service.url + "/health").status_code == 200
