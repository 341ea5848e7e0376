import uuid

import pytest

from tide_vllm.domain.chat.entity import (
    EngineState,
    EngineStatus,
    InvalidChatRequest,
    Message,
    SamplingParams,
)
from tide_vllm.domain.chat.factory import ChatDefaults, ChatFactory

DEFAULTS = ChatDefaults(
    model="m", system_prompt="你是一个有用的AI助手。", max_tokens=2048, temperature=0.7, top_p=0.9
)


def test_a_prompt_gets_the_default_system_prompt_and_sampling_defaults():
    chat = ChatFactory(DEFAULTS).from_prompt("hi")
    assert chat.messages == (Message("system", "你是一个有用的AI助手。"), Message("user", "hi"))
    assert chat.params == SamplingParams(max_tokens=2048, temperature=0.7, top_p=0.9)
    assert chat.model == "m"


def test_without_a_request_id_a_uuid4_is_made():
    chat = ChatFactory(DEFAULTS).from_prompt("hi")
    assert uuid.UUID(chat.request_id).version == 4


def test_the_callers_request_id_and_parameters_win():
    chat = ChatFactory(DEFAULTS).from_prompt(
        "hi", system_prompt="be brief", request_id="abc", max_tokens=5, temperature=0, top_p=1
    )
    assert chat.request_id == "abc"
    assert chat.messages[0] == Message("system", "be brief")
    assert chat.params == SamplingParams(max_tokens=5, temperature=0.0, top_p=1.0)


def test_an_empty_system_prompt_sends_no_system_message():
    chat = ChatFactory(DEFAULTS).from_prompt("hi", system_prompt="")
    assert chat.messages == (Message("user", "hi"),)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ],
)
def test_invalid_values_name_their_field(kwargs, field):
    prompt = kwargs.pop("prompt")
    with pytest.raises(InvalidChatRequest) as info:
        ChatFactory(DEFAULTS).from_prompt(prompt, **kwargs)
    assert info.value.field == field


def test_a_starting_engine_refuses_requests_but_an_external_one_is_tried():
    assert not EngineStatus(EngineState.STARTING, False, "").accepts_requests
    assert not EngineStatus(EngineState.FAILED, False, "").accepts_requests
    assert EngineStatus(EngineState.READY, True, "").accepts_requests
    assert EngineStatus(EngineState.EXTERNAL, False, "down at last probe").accepts_requests


def test_an_openai_request_is_carried_whole_with_the_served_model_filled_in():
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function"}],
        "top_k": 5,
        "stream": True,
    }
    chat = ChatFactory(DEFAULTS).from_openai(body, request_id="r")
    assert chat.payload == {**body, "model": "m", "max_tokens": DEFAULTS.max_tokens}
    assert (chat.model, chat.stream, chat.request_id) == ("m", True, "r")


def test_an_openai_request_keeps_its_own_model_and_limit():
    body = {"model": "other", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    chat = ChatFactory(DEFAULTS).from_openai(body)
    assert chat.payload is body and chat.model == "other" and not chat.stream


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ({}, {"max_tokens": 2048}),
        ({"max_tokens": None}, {"max_tokens": 2048}),
        ({"max_tokens": 7}, {"max_tokens": 7}),
        ({"max_completion_tokens": 7}, {"max_completion_tokens": 7}),
    ],
)
def test_an_openai_request_without_a_limit_gets_the_configured_max_tokens(given, sent):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **given}
    chat = ChatFactory(DEFAULTS).from_openai(body)
    assert chat.payload == {"model": "m", "messages": body["messages"], **sent}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "model": 3}, "model"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": "maybe"}, "stream"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": 2}, "stream"),
    ],
)
def test_a_malformed_openai_request_names_its_field(body, field):
    with pytest.raises(InvalidChatRequest) as info:
        ChatFactory(DEFAULTS).from_openai(body)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("given", "model", "stream"),
    [
        ({"model": ""}, "m", False),
        ({"stream": 1}, "m", True),
        ({"stream": "true"}, "m", True),
        ({"stream": "0"}, "m", False),
        ({"messages": []}, "m", False),  # vLLM says what is wrong with it
        ({"messages": [{"content": "hi"}]}, "m", False),
    ],
)
def test_what_vllm_accepts_or_refuses_itself_is_not_refused_here(given, model, stream):
    body = {"messages": [{"role": "user", "content": "hi"}], **given}
    chat = ChatFactory(DEFAULTS).from_openai(body)
    assert (chat.model, chat.stream) == (model, stream)
    assert chat.payload["messages"] == body["messages"]


def test_the_tide_answer_body_is_what_its_schema_describes():
    from tide_vllm.domain.chat.entity import ChatResult, Usage
    from web.modules.tidevllm.schemas import TideChatResponse

    for result in (
        ChatResult("r-1", "Hello ü", "m", Usage(3, 2, 5), "stop"),
        ChatResult("r-2", "", "m"),
    ):
        body = TideChatResponse.body_of(result)
        assert TideChatResponse.model_validate(body).model_dump() == body
        assert list(body) == list(TideChatResponse.model_fields)
