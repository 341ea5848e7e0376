"""vLLM's own port cannot be used to go around tide-vllm's API keys: the vLLM that tide-vllm
starts only answers with the random key tide-vllm gave it."""

import httpx
import pytest

pytestmark = pytest.mark.e2e

BODY = {
    "model": "SmolLM2-135M-Instruct",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
}


def test_a_request_straight_to_vllm_without_its_key_is_refused(real_service):
    vllm = f"http://127.0.0.1:{real_service.config['vllm']['port']}"
    direct = httpx.post(vllm + "/v1/chat/completions", json=BODY, timeout=30)
    assert direct.status_code == 401
    guessed = httpx.post(
        vllm + "/v1/chat/completions",
        json=BODY,
        headers={"Authorization": "Bearer e2e-user-key"},  # a user key is not vLLM's key
        timeout=30,
    )
    assert guessed.status_code == 401
    through = real_service.http.post("/v1/chat/completions", json=BODY)
    assert through.status_code == 200
    assert through.json()["choices"][0]["message"]["content"]


def test_tide_vllm_refuses_requests_without_a_user_key(real_service):
    r = httpx.post(real_service.url + "/v1/chat/completions", json=BODY, timeout=30)
    assert r.status_code == 401
    assert httpx.get(real_service.url + "/health").status_code == 200
