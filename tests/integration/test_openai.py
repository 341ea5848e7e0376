"""OpenAI compatibility: the official SDK, sync and async, against tide-vllm (a real uvicorn
server, manual mode) in front of a fake upstream that records what it received."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.fakes.upstream import MODEL, Recorder, ServerThread, build_upstream
from tests.helpers import free_port
from tide_vllm.domain.chat.factory import ChatDefaults
from tide_vllm.provider.provider import ProviderSettings
from tide_vllm_cmd.app.options.plugin_web_handler import build_app
from web.modules.tidevllm import chat as chat_endpoint

HI = [{"role": "user", "content": "hi"}]


def tide_in_front_of(upstream_url: str, timeout: float = 10) -> ServerThread:
    settings = ProviderSettings(
        base_url=upstream_url,
        timeout=timeout,
        defaults=ChatDefaults(MODEL, "你是一个有用的AI助手。", 256, 0.7, 0.9),
    )
    return ServerThread(build_app(settings), free_port())


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def upstream(recorder: Recorder) -> Iterator[ServerThread]:
    with ServerThread(build_upstream(recorder), free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def tide(upstream: ServerThread) -> Iterator[ServerThread]:
    with tide_in_front_of(upstream.url) as server:
        yield server


@pytest.fixture
def client(tide: ServerThread, recorder: Recorder) -> openai.OpenAI:
    recorder.clear()
    return openai.OpenAI(base_url=tide.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def aclient(tide: ServerThread, recorder: Recorder) -> openai.AsyncOpenAI:
    recorder.clear()
    return openai.AsyncOpenAI(base_url=tide.url + "/v1", api_key="unused", max_retries=0)


# -- fidelity ---------------------------------------------------------------------------------

EVERY_FIELD = {
    "model": MODEL,
    "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
    "tool_choice": "auto",
    "response_format": {"type": "json_object"},
    "n": 1,
    "stop": ["\n\n", "END"],
    "seed": 7,
    "logprobs": True,
    "top_logprobs": 2,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "max_completion_tokens": 33,
    "user": "u-1",
    "top_k": 5,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "structured_outputs": {"json": {"type": "object"}},
    "chat_template_kwargs": {"enable_thinking": False},
    "temperature": 0.3,
    "top_p": 0.8,
}


def test_every_field_of_an_openai_request_reaches_vllm_unchanged(tide, recorder):
    recorder.clear()
    r = httpx.post(tide.url + "/v1/chat/completions", json=EVERY_FIELD)
    assert r.status_code == 200
    assert recorder.bodies == [EVERY_FIELD]


def test_a_streamed_request_reaches_vllm_unchanged_with_its_stream_options(tide, recorder):
    recorder.clear()
    body = {
        "model": MODEL,
        "messages": HI,
        "stream": True,
        "stream_options": {"include_usage": True},
        "top_k": 3,
        "max_completion_tokens": 20,
    }
    with httpx.stream("POST", tide.url + "/v1/chat/completions", json=body) as r:
        r.read()
    assert recorder.bodies == [body]


def test_a_missing_model_becomes_the_served_model_and_a_missing_limit_vllm_max_tokens(
    tide, recorder
):
    recorder.clear()
    r = httpx.post(tide.url + "/v1/chat/completions", json={"messages": HI})
    assert r.status_code == 200
    assert recorder.bodies == [{"messages": HI, "model": MODEL, "max_tokens": 256}]


def test_every_field_vllm_returns_reaches_the_client_unchanged(tide, upstream, recorder):
    body = {"model": MODEL, "messages": HI, "logprobs": True, "n": 2}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body)
    through = httpx.post(tide.url + "/v1/chat/completions", json=body)
    assert through.status_code == 200
    assert through.json() == direct.json()
    assert through.json()["system_fingerprint"] == "fp_fake"
    assert through.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert through.headers["content-type"] == "application/json"


def test_the_stream_is_relayed_event_for_event(tide, upstream):
    body = {
        "model": MODEL,
        "messages": HI,
        "stream": True,
        "n": 2,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", upstream.url + "/v1/chat/completions", json=body) as r:
        direct = r.read()
    with httpx.stream("POST", tide.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        through = r.read()
    assert through == direct
    assert through.endswith(b"data: [DONE]\n\n")


def test_streams_read_to_their_end_leave_the_upstream_connection_for_the_next(tide, recorder):
    # Closing the connection is how tide-vllm tells vLLM a client left; a stream that ended
    # normally must not be mistaken for that, nor cost a new connection. The client has its
    # whole answer at [DONE], before the upstream body ends (here 0.1 s later), so a request
    # sent meanwhile takes another connection; once the bodies have ended, they are reused.
    recorder.clear()
    lingering = [{"role": "user", "content": "lingering end"}]
    openai_body = {"model": MODEL, "messages": lingering, "stream": True}
    tide_body = {"prompt": "lingering end", "stream": True}
    rounds = [("/v1/chat/completions", openai_body), ("/chat/completions", tide_body)] * 2
    for path, body in rounds:
        with httpx.stream("POST", tide.url + path, json=body) as r:
            assert r.read().endswith(b"data: [DONE]\n\n")
        time.sleep(0.3)  # the upstream body ends
    assert len(recorder.peers) == 4
    assert recorder.abandoned == []
    assert len(set(recorder.peers)) == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_a_streams_head_arrives_once_vllm_accepts_before_the_first_token(tide, recorder, path):
    # vLLM answers a stream's head at once and its first token after the prompt is processed
    # (seconds, for a long prompt); the client learns its request was accepted meanwhile.
    held = [{"role": "user", "content": "held"}]
    body = {"model": MODEL, "messages": held, "stream": True}
    if path == "/chat/completions":
        body = {"prompt": "held", "stream": True}
    recorder.release.clear()
    try:
        with httpx.stream("POST", tide.url + path, json=body, timeout=5) as r:
            assert r.status_code == 200 and not recorder.release.is_set()  # no event yet
            assert r.headers["content-type"].startswith("text/event-stream")
            recorder.release.set()
            text = r.read()
    finally:
        recorder.release.set()
    events = [line[6:] for line in text.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(event).get("error") is None for event in events[:-1])


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_a_body_with_messages_is_openais_even_with_a_prompt_field(tide, recorder, path):
    """vLLM ignores a field it does not know: so does tide-vllm, on every chat path."""
    recorder.clear()
    body = {"model": MODEL, "prompt": "hi", "messages": HI, "max_tokens": 5}
    r = httpx.post(tide.url + path, json=body)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert recorder.bodies == [body]


def test_the_tide_shape_still_works_on_v1(tide):
    r = httpx.post(tide.url + "/v1/chat/completions", json={"prompt": "hi", "request_id": "t1"})
    assert r.status_code == 200
    assert r.json()["request_id"] == "t1" and r.json()["content"] == "Hello from the fake."


# -- the official SDK --------------------------------------------------------------------------


def test_sdk_plain_completion(client):
    completion = client.chat.completions.create(model=MODEL, messages=HI)
    assert completion.choices[0].message.content == "Hello from the fake."
    assert completion.usage.total_tokens == 14
    assert completion.system_fingerprint == "fp_fake"


def test_sdk_stream_and_include_usage(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HI, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake."
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_sdk_n_2(client):
    completion = client.chat.completions.create(model=MODEL, messages=HI, n=2)
    assert [c.index for c in completion.choices] == [0, 1]


def test_sdk_tools(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=HI, tools=EVERY_FIELD["tools"], tool_choice="auto"
    )
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_sdk_models_list(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_sdk_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=HI)
    assert info.value.status_code == 404
    assert "does not exist" in info.value.message


def test_sdk_unknown_model_in_a_stream_raises_not_found_before_any_chunk(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HI, stream=True)


def test_sdk_vllm_validation_error_raises_bad_request_with_its_param(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=-1)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "max_tokens"


def test_sdk_our_own_validation_error_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HI, extra_body={"stream": "maybe"})
    assert info.value.body["param"] == "stream"


def test_what_vllm_validates_is_left_to_vllm(client, recorder):
    """Empty messages reach vLLM, and vLLM's refusal is what the client gets."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=3)
    assert "invalid request: IndexError" in info.value.message  # the fake vLLM's own words
    assert recorder.bodies == [{"model": MODEL, "messages": [], "max_tokens": 3}]


def test_vllms_request_id_field_names_the_request_without_a_header(tide, recorder):
    recorder.clear()
    body = {"model": MODEL, "messages": HI, "max_tokens": 3, "request_id": "body-id-1"}
    r = httpx.post(tide.url + "/v1/chat/completions", json=body)
    assert r.headers["x-request-id"] == "body-id-1"
    assert recorder.headers[0]["x-request-id"] == "body-id-1"


async def test_async_sdk_plain_stream_and_errors(aclient):
    completion = await aclient.chat.completions.create(model=MODEL, messages=HI)
    assert completion.choices[0].message.content == "Hello from the fake."
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello from the fake."
    )
    assert chunks[-1].usage.total_tokens == 14
    assert [m.id async for m in aclient.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        await aclient.chat.completions.create(model="nope", messages=HI)


def test_sdk_vllm_down_raises_503():
    with tide_in_front_of(f"http://127.0.0.1:{free_port()}") as down:
        client = openai.OpenAI(base_url=down.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=MODEL, messages=HI)
        assert info.value.status_code == 503
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=MODEL, messages=HI, stream=True)
        assert info.value.status_code == 503
        with pytest.raises(openai.InternalServerError):
            client.models.list()


def test_sdk_vllm_too_slow_raises_504(upstream):
    with tide_in_front_of(upstream.url, timeout=0.5) as slow:
        client = openai.OpenAI(base_url=slow.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hang"}]
            )
        assert info.value.status_code == 504


# -- streams that fail, and clients that leave -------------------------------------------------


def test_an_upstream_that_dies_mid_stream_gives_an_error_event_then_done():
    broken = _BrokenStreamUpstream()
    with ServerThread(broken.app, free_port()) as up, tide_in_front_of(up.url) as tide:
        with httpx.stream(
            "POST",
            tide.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": HI, "stream": True},
        ) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0][6:])["choices"][0]["delta"]["content"] == "partial"
    error = json.loads(events[-2][6:])["error"]
    assert error["code"] == 503 and "lost the connection" in error["message"]
    assert events[-1] == "data: [DONE]"


def test_a_bug_of_ours_mid_stream_still_ends_it_with_an_error_event_then_done(tide, monkeypatch):
    counted = chat_endpoint._usage_of

    def bug(raw: bytes):
        if b" w3" in raw:
            raise RuntimeError("a bug in tide-vllm")
        return counted(raw)

    monkeypatch.setattr(chat_endpoint, "_usage_of", bug)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "slow"}], "stream": True}
    with httpx.stream("POST", tide.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        text = r.read().decode()
    events = [line for line in text.splitlines() if line.startswith("data: ")]
    assert (
        json.loads(events[-2][6:])["error"]["message"] == "internal error in tide-vllm; see its log"
    )
    assert events[-1] == "data: [DONE]"
    assert "Traceback" not in text and "a bug" not in text


class _BrokenStreamUpstream:
    """Sends one event, then drops the connection without ending the chunked body."""

    def __init__(self) -> None:
        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
                return
            await receive()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            event = {"choices": [{"index": 0, "delta": {"content": "partial"}}]}
            await send(
                {
                    "type": "http.response.body",
                    "more_body": True,
                    "body": b"data: " + json.dumps(event).encode() + b"\n\n",
                }
            )
            raise RuntimeError("upstream crashed mid-stream")

        self.app = app


def test_a_client_leaving_a_stream_cancels_the_upstream_within_a_second(tide, recorder):
    recorder.clear()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "slow"}], "stream": True}
    with httpx.stream("POST", tide.url + "/v1/chat/completions", json=body) as r:
        next(r.iter_raw())
        left = time.monotonic()
    _assert_abandoned_soon(recorder, left)


def test_a_client_leaving_a_plain_request_cancels_the_upstream_within_a_second(tide, recorder):
    recorder.clear()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hang"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tide.url + "/v1/chat/completions", json=body, timeout=0.5)
    _assert_abandoned_soon(recorder, time.monotonic())


def test_a_client_leaving_a_tide_stream_cancels_the_upstream(tide, recorder):
    recorder.clear()
    body = {"prompt": "slow", "stream": True}
    with httpx.stream("POST", tide.url + "/chat/completions", json=body) as r:
        next(r.iter_raw())
        left = time.monotonic()
    _assert_abandoned_soon(recorder, left)


def _assert_abandoned_soon(recorder: Recorder, left: float) -> None:
    deadline = left + 1.0
    while not recorder.abandoned and time.monotonic() < deadline + 0.5:
        time.sleep(0.02)
    assert recorder.abandoned, "the upstream never saw the client leave"
    assert recorder.abandoned[0] - left < 1.0


# -- the Tide stream ---------------------------------------------------------------------------


def test_a_tide_stream_sends_deltas_then_finish_reason_and_usage_then_done(tide, recorder):
    recorder.clear()
    with httpx.stream(
        "POST",
        tide.url + "/chat/completions",
        json={"prompt": "hi", "stream": True, "request_id": "s1"},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"] == "s1"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["request_id"] == "s1" and e["model"] == MODEL for e in events)
    assert "".join(e["content"] for e in events) == "Hello from the fake."
    assert all(e["finish_reason"] is None and e["usage"] is None for e in events[:-1])
    assert events[-1]["finish_reason"] == "stop"
    assert events[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    assert recorder.bodies[-1]["stream_options"] == {"include_usage": True}


# -- upstream faults ---------------------------------------------------------------------------


def test_a_vllm_server_error_is_relayed_with_its_status_and_message(client):
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "fail500"}]
        )
    assert info.value.status_code == 500
    assert "EngineCore encountered an issue." in info.value.message


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_an_upstream_answer_that_is_not_json_is_a_502(tide, path):
    r = httpx.post(
        tide.url + path, json={"model": MODEL, "messages": [{"role": "user", "content": "html"}]}
    )
    assert r.status_code == 502
    assert "not JSON" in r.json()["error"]["message"]
    assert httpx.get(tide.url + "/v1/models").status_code == 200  # and tide-vllm is fine
