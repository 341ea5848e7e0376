"""The access line written straight to the log's stream is the line the logging path gives."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from tide_vllm_cmd.app.options.plugin_logs import (
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    access_writer,
)
from web.gateway import ACCESS_LOGGER, REQUEST_ID, AccessLine

LINES = [
    AccessLine("POST", "/v1/chat/completions", 200, 0.01234, "openai", "m", 9, 8),
    AccessLine("POST", "/chat/completions", 415, 0.0004, "tide", None, None, None),
    AccessLine("POST", "/v1/completions", 200, 0.2, "openai", "m", 3, 2, [("r0", "affinity")]),
]
RETRIED = AccessLine(
    "POST", "/v1/chat/completions", 200, 0.5, "openai", "m", 9, 8,
    [("r0", "sticky"), ("r1", "load")],
)  # fmt: skip
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def through_logging(formatter: logging.Formatter, line: AccessLine) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger(ACCESS_LOGGER)
    record = logger.makeRecord(
        ACCESS_LOGGER, logging.INFO, "", 0, line.message(), None, None, extra=line.fields()
    )
    handler.handle(record)
    return out.getvalue()


def written(formatter: logging.Formatter, line: AccessLine) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    access_writer(handler, formatter)(line)
    return out.getvalue()


@pytest.mark.parametrize("line", LINES)
def test_text_lines_match(line):
    token = REQUEST_ID.set("req-7")
    try:
        expected, got = through_logging(TextFormatter(), line), written(TextFormatter(), line)
    finally:
        REQUEST_ID.reset(token)
    assert STAMP.match(got) and got.endswith("\n") and got.count("\n") == 1
    assert STAMP.sub("", got) == STAMP.sub("", expected)
    assert "INFO    tide_vllm.access [req-7] " in got


@pytest.mark.parametrize("line", LINES)
def test_json_lines_match(line):
    token = REQUEST_ID.set("req-8")
    try:
        expected = json.loads(through_logging(JsonFormatter(), line))
        got = json.loads(written(JsonFormatter(), line))
    finally:
        REQUEST_ID.reset(token)
    assert got.pop("time") and expected.pop("time")
    assert got == expected
    assert got["request_id"] == "req-8" and got["status"] == line.status


def test_a_fleets_line_names_the_engine_that_answered_and_the_one_tried_before():
    assert RETRIED.message().endswith(" engine=r1 routing=load tried=r0")
    assert {k: RETRIED.fields()[k] for k in ("engine", "routing", "tried")} == {
        "engine": "r1",
        "routing": "load",
        "tried": ["r0"],
    }
    assert LINES[2].message().endswith(" engine=r0 routing=affinity")
    assert LINES[2].fields()["tried"] == []


def test_a_single_engines_line_has_no_engine():
    assert "engine=" not in LINES[0].message()
    assert "engine" not in LINES[0].fields()
