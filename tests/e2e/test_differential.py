"""The same request straight to vLLM and through tide-vllm gets the same answer: a table of
OpenAI requests (plain, n, stop, logprobs, response formats, structured outputs, tools, vLLM's
extras, streams, errors) and the other routes of vLLM's API, compared after masking what
differs between any two calls (ids, timestamps, fingerprints).

Generated text is compared by its type, not its words: two runs of the same request may pick
other tokens (prefix caching changes the arithmetic's shapes), and the words change with the
CPU anyway. Token counts are exact where `ignore_eos` fixes them."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from .conftest import API_KEY, VLLM_KEY

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Say hello."}]
FIXED = {"max_tokens": 4, "ignore_eos": True, "temperature": 0}  # exactly 4 tokens
MASKED = {"id", "created", "created_at", "system_fingerprint", "request_id"}
# Values the model chooses: compared by type.
GENERATED = {
    "content", "text", "reasoning_content", "reasoning", "token", "bytes", "logprob",
    "arguments", "token_ids", "prompt_logprobs", "output_text",
}  # fmt: skip
# Where the words decide: when a stop string came, the finish reason and token count.
LOOSE = {"finish_reason", "completion_tokens", "total_tokens", "stop_reason", "matched_stop"}

CHAT = "/v1/chat/completions"


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, **FIXED, **extra}


# (name, method, path, body, loose): loose = the words decide when it ends.
CASES: list[tuple[str, str, str, Any, bool]] = [
    ("plain", "POST", CHAT, chat(), False),
    ("system message", "POST", CHAT,
     chat(messages=[{"role": "system", "content": "Be brief."}, *HI]), False),
    ("two turns", "POST", CHAT,
     chat(messages=[*HI, {"role": "assistant", "content": "Hello."}, *HI]), False),
    ("n=2", "POST", CHAT, chat(n=2), False),
    ("seeded sampling", "POST", CHAT, chat(temperature=0.8, seed=42), False),
    ("top_p top_k min_p", "POST", CHAT, chat(top_p=0.5, top_k=5, min_p=0.1), False),
    ("penalties", "POST", CHAT,
     chat(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1), False),
    ("max_completion_tokens", "POST", CHAT,
     {"model": MODEL, "messages": HI, "max_completion_tokens": 3, "ignore_eos": True}, False),
    ("min_tokens", "POST", CHAT, chat(min_tokens=2), False),
    ("stop strings", "POST", CHAT, chat(stop=["\n", "."], max_tokens=8), True),
    ("stop token ids", "POST", CHAT, chat(stop_token_ids=[2]), True),
    ("logprobs", "POST", CHAT, chat(logprobs=True, top_logprobs=2), False),
    ("json object", "POST", CHAT, chat(response_format={"type": "json_object"}), False),
    ("json schema", "POST", CHAT, chat(max_tokens=6, response_format={
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": {"type": "object", "properties": {
            "a": {"type": "integer"}}}}}), False),
    ("structured choice", "POST", CHAT,
     {"model": MODEL, "messages": HI, "max_tokens": 4, "structured_outputs":
      {"choice": ["yes", "no"]}}, True),
    ("structured regex", "POST", CHAT,
     {"model": MODEL, "messages": HI, "max_tokens": 6, "structured_outputs":
      {"regex": "[0-9]{3}"}}, True),
    ("tools, none chosen", "POST", CHAT, chat(tool_choice="none", tools=[{
        "type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
     False),
    ("tools, auto (not enabled on this server)", "POST", CHAT, chat(tool_choice="auto", tools=[{
        "type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
     False),
    ("chat template kwargs", "POST", CHAT,
     chat(chat_template_kwargs={"enable_thinking": False}), False),
    ("skip special tokens off", "POST", CHAT, chat(skip_special_tokens=False), False),
    ("echo", "POST", CHAT, chat(echo=True), False),
    ("user field", "POST", CHAT, chat(user="someone"), False),
    ("empty model", "POST", CHAT, chat(model=""), False),
    ("no model", "POST", CHAT, {k: v for k, v in chat().items() if k != "model"}, False),
    ("stream as 1", "POST", CHAT, chat(stream=1), False),
    ("stream as 'true'", "POST", CHAT, chat(stream="true"), False),
    ("an extra prompt field", "POST", CHAT, chat(prompt="ignored"), False),
    ("vLLM's request_id field", "POST", CHAT, chat(request_id="diff-1"), False),
    ("stream", "POST", CHAT, chat(stream=True), False),
    ("stream with usage", "POST", CHAT,
     chat(stream=True, stream_options={"include_usage": True}), False),
    ("stream n=2", "POST", CHAT, chat(stream=True, n=2), False),
    ("stream logprobs", "POST", CHAT, chat(stream=True, logprobs=True, top_logprobs=1), False),
    ("error: max_tokens -1", "POST", CHAT, chat(max_tokens=-1), False),
    ("error: unknown model", "POST", CHAT, chat(model="no-such-model"), False),
    ("error: empty messages", "POST", CHAT, chat(messages=[]), False),
    ("error: a message without role", "POST", CHAT, chat(messages=[{"content": "x"}]), False),
    ("error: temperature -1", "POST", CHAT, chat(temperature=-1), False),
    ("error: n=0", "POST", CHAT, chat(n=0), False),
    ("error: top_logprobs 100", "POST", CHAT, chat(logprobs=True, top_logprobs=100), False),
    ("error: beyond the context", "POST", CHAT, chat(max_tokens=100_000), False),
    ("error: stream unknown model", "POST", CHAT, chat(model="nope", stream=True), False),
    ("completions", "POST", "/v1/completions",
     {"model": MODEL, "prompt": "Hello", **FIXED}, False),
    ("completions echo logprobs", "POST", "/v1/completions",
     {"model": MODEL, "prompt": "Hello", "echo": True, "logprobs": 1, **FIXED}, False),
    ("completions stream", "POST", "/v1/completions",
     {"model": MODEL, "prompt": "Hello", "stream": True, **FIXED}, False),
    ("completions error", "POST", "/v1/completions", {"model": MODEL, "prompt": 3}, False),
    ("responses", "POST", "/v1/responses",
     {"model": MODEL, "input": "Say hello.", "max_output_tokens": 4, "temperature": 0}, True),
    ("tokenize", "POST", "/tokenize", {"model": MODEL, "prompt": "Hello world"}, False),
    ("tokenize chat", "POST", "/tokenize", {"model": MODEL, "messages": HI}, False),
    ("detokenize", "POST", "/detokenize", {"model": MODEL, "tokens": [19556, 905]}, False),
    ("embeddings (a generation model)", "POST", "/v1/embeddings",
     {"model": MODEL, "input": "hi"}, False),
    ("models", "GET", "/v1/models", None, False),
    ("version", "GET", "/version", None, False),
    ("a route vLLM does not serve", "GET", "/v1/no-such-route", None, False),
]  # fmt: skip


def _normalise(node: Any, loose: bool) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in MASKED or (loose and key in LOOSE):
                out[key] = "<masked>"
            elif key in GENERATED and not isinstance(value, dict):
                out[key] = f"<{type(value).__name__}>"
            elif key == "top_logprobs" and isinstance(value, list):
                out[key] = [_normalise(v, loose) for v in value]
            elif key in ("output", "content") and isinstance(value, list):
                out[key] = [_normalise(v, loose) for v in value]
            else:
                out[key] = _normalise(value, loose)
        return out
    if isinstance(node, list):
        return [_normalise(v, loose) for v in node]
    return node


def _answer(response: httpx.Response, loose: bool) -> Any:
    kind = response.headers.get("content-type", "")
    if kind.startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        body: Any = [e if e == "[DONE]" else json.loads(e) for e in events]
        if loose:  # a stream's length is the text's
            body = [body[0], body[-1]]
    elif "json" in kind:
        body = response.json()
    else:
        body = response.text
    return {
        "status": response.status_code,
        "type": kind.split(";")[0],
        "body": _normalise(body, loose),
    }


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "loose"), CASES, ids=[c[0] for c in CASES]
)
def test_tide_vllm_answers_what_vllm_answers(real_service, name, method, path, body, loose):
    vllm = f"http://127.0.0.1:{real_service.config['vllm']['port']}"
    sent = {"json": body} if body is not None else {}
    direct = httpx.request(
        method, vllm + path, headers={"Authorization": f"Bearer {VLLM_KEY}"}, timeout=60, **sent
    )
    through = httpx.request(
        method,
        real_service.url + path,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
        **sent,
    )
    assert _answer(through, loose) == _answer(direct, loose)


def test_a_body_that_starts_with_a_bom_is_taken_as_vllm_takes_it(real_service):
    vllm = f"http://127.0.0.1:{real_service.config['vllm']['port']}"
    raw = b"\xef\xbb\xbf" + json.dumps(chat()).encode()
    answers = [
        httpx.post(url + CHAT, content=raw, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"}, timeout=60)
        for url, key in ((vllm, VLLM_KEY), (real_service.url, API_KEY))
    ]  # fmt: skip
    assert _answer(answers[1], False) == _answer(answers[0], False)


def test_the_sdk_completions_responses_and_embeddings_work_through_tide_vllm(real_service):
    import openai

    client = openai.OpenAI(base_url=real_service.url + "/v1", api_key=API_KEY, max_retries=0)
    completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    assert completion.choices[0].text and completion.usage.completion_tokens <= 4
    response = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8)
    assert response.status in ("completed", "incomplete") and response.output
    with pytest.raises(openai.APIStatusError) as info:  # no pooling model is served
        client.embeddings.create(model=MODEL, input="hi")
    assert 400 <= info.value.status_code < 500
