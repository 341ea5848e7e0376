"""The official OpenAI SDK against tide-vllm on the real CPU vLLM and the demo model.

No assertion relies on the words the model chooses (they change with the CPU's numerics)."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from .conftest import API_KEY

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(real_service) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_service.url + "/v1", api_key=API_KEY, max_retries=0)


def test_sdk_plain_call_answers(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=24
    )
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 0 and 0 < completion.usage.completion_tokens <= 24
    assert completion.model == MODEL


def test_sdk_stream_comes_token_by_token_with_its_usage_last(client):
    # ignore_eos: exactly max_tokens tokens, whatever the model would say.
    params = dict(model=MODEL, messages=QUESTION, max_tokens=12, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**params)
    chunks = list(
        client.chat.completions.create(
            **params, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(contents) > 1 and "".join(contents).strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 12 == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_sdk_models_list_and_errors_are_vllms(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert info.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=-1)
    assert info.value.status_code == 400


def _running(vllm_metrics: str) -> float:
    text = httpx.get(vllm_metrics, timeout=5).text
    values = re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+-]+)$", text, re.M)
    assert values, "vllm:num_requests_running not found in vLLM's /metrics"
    return sum(float(v) for v in values)


def test_an_abandoned_stream_stops_the_generation_in_vllm(real_service):
    vllm_metrics = f"http://127.0.0.1:{real_service.config['vllm']['port']}/metrics"
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    with real_service.http.stream("POST", "/v1/chat/completions", json=body) as r:
        events = r.iter_lines()
        for _ in range(5):
            next(events)
        assert _running(vllm_metrics) >= 1, "vLLM should be generating while we read"
        left = time.monotonic()
    while _running(vllm_metrics) > 0:
        assert time.monotonic() - left < 2.0, "vLLM kept generating for a client that left"
        time.sleep(0.05)
