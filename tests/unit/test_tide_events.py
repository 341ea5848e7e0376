"""The Tide stream's events (web/modules/tidevllm/chat.py, _TideEvents): a text event is made
from two fixed parts around its content; it must be the same bytes as the event dumped whole."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tide_vllm.domain.chat.entity import ChatDelta, Usage
from web.modules.tidevllm.chat import DONE, _TideEvents

TEXTS = [
    "Hello",
    " world",
    'a "quoted" word',
    "back\\slash",
    "line\nbreak\ttab\r",
    "\x00\x01\x1f control",
    "你是一个有用的AI助手。",
    "emoji 🎉 and é",
    "</script><!--",
    "\u2028\u2029",
]


def whole(request_id: str, model: str, content: str, **fields: Any) -> bytes:
    event = {
        "request_id": request_id,
        "content": content,
        "model": model,
        "usage": None,
        "finish_reason": None,
        "error": None,
        **fields,
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(
    ("request_id", "model"),
    [("req-1", "demo"), ('id "with" \\ quotes', "模型/名字"), ("x" * 256, "")],
)
def test_a_text_event_is_the_event_dumped_whole(text: str, request_id: str, model: str) -> None:
    render = _TideEvents({"request_id": request_id}, model)
    event = render([ChatDelta(content=text)])
    assert event == whole(request_id, model, text)
    parsed = orjson.loads(event[len(b"data: ") : -2])
    assert (parsed["content"], parsed["request_id"], parsed["model"]) == (text, request_id, model)


def test_deltas_that_came_together_are_one_block_ending_with_done() -> None:
    state: dict[str, Any] = {"request_id": "r"}
    render = _TideEvents(state, "m")
    assert render([]) == b""
    assert "first_token_at" not in state
    block = render(
        [
            ChatDelta(content="Hel"),
            ChatDelta(content="lo"),
            ChatDelta(finish_reason="stop", usage=Usage(3, 2, 5)),
        ]
    )
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert block == (
        whole("r", "m", "Hel")
        + whole("r", "m", "lo")
        + whole("r", "m", "", finish_reason="stop", usage=usage)
        + DONE
    )
    assert state["usage"] == (3, 2)
    assert "first_token_at" in state


def test_the_time_of_the_first_text_is_kept_from_the_first_text_on() -> None:
    state: dict[str, Any] = {"request_id": "r"}
    render = _TideEvents(state, "m")
    render([ChatDelta(content="a")])
    first = state["first_token_at"]
    render([ChatDelta(content="b")])
    assert state["first_token_at"] == first


def test_a_last_delta_without_finish_reason_or_usage_leaves_done_to_the_relay() -> None:
    # A stream that ended without either still gets its last event; the relay adds [DONE].
    render = _TideEvents({"request_id": "r"}, "m")
    assert render([ChatDelta()]) == whole("r", "m", "")
