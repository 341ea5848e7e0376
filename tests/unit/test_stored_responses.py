"""Which relayed requests are about a stored response of the Responses API (and so go to the
engine that stored it), and how a response's id is read from vLLM's answer creating it."""

from __future__ import annotations

import pytest

from tide_vllm.application.engines import _RESPONSE_ID
from tide_vllm.application.relay_handler import _stored_response


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("GET", "/v1/responses/resp_1", {}, "resp_1"),
        ("DELETE", "/v1/responses/resp_1", {}, "resp_1"),
        ("POST", "/v1/responses/resp_1/cancel", {}, "resp_1"),
        ("POST", "/v1/responses", {"previous_response_id": "resp_0"}, "resp_0"),
        ("POST", "/v1/responses", {"input": "hi"}, None),  # a new conversation
        ("POST", "/v1/responses", {"previous_response_id": ""}, None),
        ("POST", "/v1/responses", {"previous_response_id": 7}, None),  # vLLM's 400 to give
        ("POST", "/v1/responses/render", {"previous_response_id": "resp_0"}, None),
        ("GET", "/v1/responses/resp_1/input_items/x", {}, None),
        ("GET", "/v1/responses/", {}, None),
        ("POST", "/v1/responses/resp_1", {}, None),
        ("GET", "/v1/chat/completions", {}, None),
    ],
)
def test_requests_about_a_stored_response(method, path, body, expected):
    assert _stored_response(method, path, body) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b'{"id":"resp_abc123","object":"response","output":[{"id":"msg_1"}]}', b"resp_abc123"),
        (b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
         b'"response":{"id": "resp_9f", "object": "response"}}\n\n', b"resp_9f"),
        (b'{"id":"chatcmpl-1","object":"chat.completion"}', None),
    ],
)  # fmt: skip
def test_a_responses_id_is_read_from_the_answer_creating_it(answer, expected):
    found = _RESPONSE_ID.search(answer)
    assert (found.group(1) if found else None) == expected
