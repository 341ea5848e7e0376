"""Bad and hostile input gets a clear 4xx, never a 5xx, never a non-JSON error body; a
property-based fuzz run (schemathesis) over the service's own OpenAPI schema checks it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.fakes.upstream import MODEL, Recorder, ServerThread, build_upstream
from tests.helpers import free_port
from tide_vllm.domain.chat.factory import ChatDefaults
from tide_vllm.provider.provider import ProviderSettings
from tide_vllm_cmd.app.options.plugin_web_handler import build_app


@pytest.fixture(scope="module")
def tide() -> Iterator[ServerThread]:
    with ServerThread(build_upstream(Recorder()), free_port()) as upstream:
        settings_ = ProviderSettings(
            base_url=upstream.url,
            timeout=5,
            defaults=ChatDefaults(MODEL, "sys", 64, 0.7, 0.9),
        )
        app = build_app(settings_, max_body_bytes=64 * 1024)
        with ServerThread(app, free_port()) as server:
            yield server


def test_a_body_over_the_limit_is_a_413(tide):
    r = httpx.post(
        tide.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x" * 70_000}]},
    )
    assert r.status_code == 413
    assert r.json()["error"]["param"] == "body"


def test_a_chunked_body_over_the_limit_is_a_413(tide):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(
        tide.url + "/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"].startswith("body:")


def test_a_wrong_content_type_is_a_415(tide):
    r = httpx.post(tide.url + "/chat/completions", data={"prompt": "hi"})
    assert r.status_code == 415
    assert "Content-Type" in r.json()["error"]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "max_tokens": 10**12},
        {"prompt": "hi", "max_tokens": 10**30},
        {"prompt": "hi", "temperature": 1e308},
        {"prompt": "hi", "top_p": -0.0},
        {"prompt": "hi", "max_tokens": True},
        {"prompt": "hi", "request_id": "x" * 10_000},
        {"prompt": {"nested": ["deep"] * 50}},
        {"messages": [{"role": "user", "content": "hi"}], "n": "two"},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**30},
        {"messages": [None]},
    ],
)
def test_absurd_values_are_a_4xx_with_a_json_body(tide, body):
    r = httpx.post(tide.url + "/chat/completions", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]


def test_a_deeply_nested_body_is_a_400(tide):
    raw = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(
        tide.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code in (400, 413)


def test_fuzzing_the_api_finds_no_5xx_and_no_non_json_error(tide):
    """Every operation of the service's OpenAPI schema, with generated bodies (valid and not)."""
    schema = schemathesis.openapi.from_url(tide.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "GET /health",
        "GET /ready",
        "GET /v1/models",
        "POST /chat/completions",
        "POST /v1/chat/completions",
    }
    for operation in operations:
        fuzz(operation, tide.url)


def fuzz(operation, base_url: str) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=100,
        derandomize=True,  # the same examples every run: CI never fails by luck
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def no_server_error(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url)
        assert response.status_code < 500, f"{operation.label}: {response.text[:300]}"
        if response.status_code >= 400:
            content_type = response.headers.get("content-type") or [""]
            assert content_type[0].startswith("application/json"), response.text[:300]
            assert response.json()

    no_server_error()


def test_a_client_that_leaves_mid_body_leaves_no_traceback(tide, caplog):
    import socket

    host, port = tide.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"messages": ['
        )
    time.sleep(0.3)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert httpx.get(tide.url + "/health").status_code == 200
