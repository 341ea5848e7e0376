"""What an operator relies on: API keys, request ids, Prometheus metrics, the concurrency
limit, structured logs, CORS."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.fakes.upstream import MODEL, Recorder, ServerThread, build_upstream
from tests.helpers import free_port
from tests.service import ServiceProcess
from tide_vllm.domain.chat.factory import ChatDefaults
from tide_vllm.provider.provider import ProviderSettings
from tide_vllm_cmd.app.options.options import load_config
from tide_vllm_cmd.app.options.plugin_web_handler import build_app

HI = [{"role": "user", "content": "hi"}]
KEYS = ["key-one", "key-two"]


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def upstream(recorder) -> Iterator[ServerThread]:
    with ServerThread(build_upstream(recorder), free_port()) as server:
        yield server


def tide(upstream_url: str, **options) -> ServerThread:
    settings = ProviderSettings(
        base_url=upstream_url, timeout=10, defaults=ChatDefaults(MODEL, "sys", 64, 0.7, 0.9)
    )
    return ServerThread(build_app(settings, **options), free_port())


@pytest.fixture(scope="module")
def locked(upstream) -> Iterator[ServerThread]:
    with tide(upstream.url, api_keys=KEYS) as server:
        yield server


# -- API keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_a_configured_key_opens_every_route(locked, key):
    client = openai.OpenAI(base_url=locked.url + "/v1", api_key=key, max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=HI).choices
    assert [m.id for m in client.models.list()] == [MODEL]
    auth = {"Authorization": f"Bearer {key}"}
    assert (
        httpx.post(
            locked.url + "/chat/completions", json={"prompt": "hi"}, headers=auth
        ).status_code
        == 200
    )
    assert httpx.get(locked.url + "/metrics", headers=auth).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer key-one-and-more"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic a2V5LW9uZQ=="},
        {"Authorization": "key-one"},
    ],
)
def test_a_missing_or_wrong_key_is_a_401_in_openai_shape(locked, headers):
    for method, path in [
        ("POST", "/v1/chat/completions"),
        ("POST", "/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/metrics/vllm"),
    ]:
        r = httpx.request(method, locked.url + path, json={"messages": HI}, headers=headers)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == 401
        assert r.json()["error"]["type"] == "AuthenticationError"
        assert r.headers["www-authenticate"] == "Bearer"


def test_the_sdk_raises_authentication_error_on_a_wrong_key(locked):
    client = openai.OpenAI(base_url=locked.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=HI)


def test_probes_stay_open_with_keys(locked):
    assert httpx.get(locked.url + "/health").status_code == 200
    assert httpx.get(locked.url + "/ready").status_code == 200


def test_keys_come_from_the_config_and_the_environment(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("auth:\n  api_keys: [from-file]\n")
    config = load_config(path, environ={"TIDE_VLLM_API_KEYS": "env-1, env-2"})
    assert config.auth.api_keys == ["from-file", "env-1", "env-2"]


# -- request ids ---------------------------------------------------------------------------


def test_an_incoming_request_id_is_returned_and_sent_to_vllm(upstream, recorder):
    with tide(upstream.url) as server:
        recorder.clear()
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"messages": HI},
            headers={"X-Request-Id": "trace-123"},
        )
        assert r.headers["x-request-id"] == "trace-123"
        assert recorder.headers[-1]["x-request-id"] == "trace-123"
        r = httpx.get(server.url + "/health", headers={"X-Request-Id": "probe-1"})
        assert r.headers["x-request-id"] == "probe-1"


def test_without_one_a_request_id_is_made_and_returned(upstream, recorder):
    with tide(upstream.url) as server:
        recorder.clear()
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HI})
        generated = r.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f-]{36}", generated)
        assert recorder.headers[-1]["x-request-id"] == generated


def test_in_the_tide_shape_the_bodys_request_id_wins_everywhere(upstream, recorder):
    with tide(upstream.url) as server:
        recorder.clear()
        r = httpx.post(
            server.url + "/chat/completions",
            json={"prompt": "hi", "request_id": "body-id"},
            headers={"X-Request-Id": "header-id"},
        )
        assert r.json()["request_id"] == "body-id" == r.headers["x-request-id"]
        assert recorder.headers[-1]["x-request-id"] == "body-id"


# -- metrics --------------------------------------------------------------------------------


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_scrape_before_and_after_traffic_shows_it(upstream):
    with tide(upstream.url) as server:
        before = httpx.get(server.url + "/metrics").text
        httpx.post(server.url + "/chat/completions", json={"prompt": "hi"})
        httpx.post(server.url + "/v1/chat/completions", json={"messages": HI})
        with httpx.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json={"messages": HI, "stream": True, "stream_options": {"include_usage": True}},
        ) as r:
            r.read()
        httpx.post(server.url + "/v1/chat/completions", json={"model": "nope", "messages": HI})
        after = httpx.get(server.url + "/metrics").text
    route = "/v1/chat/completions"
    assert sample(before, "tide_vllm_requests_total", route=route, status="200") == 0
    assert sample(after, "tide_vllm_requests_total", route=route, shape="openai", status="200") == 2
    assert (
        sample(
            after, "tide_vllm_requests_total", route="/chat/completions", shape="tide", status="200"
        )
        == 1
    )
    assert sample(after, "tide_vllm_requests_total", route=route, status="404") == 1
    assert sample(after, "tide_vllm_prompt_tokens_total", shape="openai") == 18
    assert sample(after, "tide_vllm_completion_tokens_total", shape="tide") == 5
    assert (
        sample(after, "tide_vllm_request_duration_seconds_count", route=route, shape="openai") == 3
    )
    assert sample(after, "tide_vllm_time_to_first_token_seconds_count", shape="openai") == 1
    assert sample(after, "tide_vllm_upstream_errors_total", kind="rejected") == 1
    assert sample(after, "tide_vllm_vllm_up") == 1
    assert sample(after, "tide_vllm_vllm_restarts_total") == 0
    assert sample(after, "tide_vllm_requests_in_flight") == 1  # the scrape itself


def test_vllm_down_shows_in_the_metrics():
    with tide(f"http://127.0.0.1:{free_port()}") as server:
        httpx.get(server.url + "/health")
        httpx.post(server.url + "/v1/chat/completions", json={"messages": HI})
        text = httpx.get(server.url + "/metrics").text
    assert sample(text, "tide_vllm_vllm_up") == 0
    assert sample(text, "tide_vllm_upstream_errors_total", kind="unavailable") == 1


def test_vllms_own_metrics_are_reachable_through_tide_vllm(upstream):
    with tide(upstream.url) as server:
        r = httpx.get(server.url + "/metrics/vllm")
    assert r.status_code == 200
    assert "vllm:num_requests_running" in r.text


# -- concurrency limit ------------------------------------------------------------------------


def test_above_the_limit_a_chat_is_a_429_at_once(upstream):
    with tide(upstream.url, max_concurrent_requests=2) as server:
        hang = {"messages": [{"role": "user", "content": "hang"}]}
        threads = [threading.Thread(target=_quietly, args=(server.url, hang)) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        started = time.monotonic()
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HI})
        assert time.monotonic() - started < 0.5
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "RateLimitError"
        r = httpx.post(server.url + "/chat/completions", json={"prompt": "hi"})
        assert r.status_code == 429 and "max_concurrent_requests=2" in r.json()["error"]
        assert httpx.get(server.url + "/health").status_code == 200  # probes are not limited


def _quietly(url: str, body: dict) -> None:
    try:
        httpx.post(url + "/v1/chat/completions", json=body, timeout=1.5)
    except httpx.HTTPError:
        pass


# -- CORS ------------------------------------------------------------------------------------


def test_cors_is_off_by_default_and_on_for_configured_origins(upstream):
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with tide(upstream.url) as server:
        r = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with tide(upstream.url, cors_origins=["https://app.example"], api_keys=KEYS) as server:
        r = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.options(
            server.url + "/v1/chat/completions",
            headers={**preflight, "Origin": "https://evil.example"},
        )
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"


# -- logs (the real process) -------------------------------------------------------------------


def run_service(tmp_path, upstream: ServerThread, log: dict, auth: dict | None = None):
    port = int(upstream.url.rsplit(":", 1)[1])
    config = {
        "web": {"bind_address": {"host": "127.0.0.1", "port": free_port()}},
        "vllm": {"auto_start": False, "host": "127.0.0.1", "port": port, "model_name": MODEL},
        "log": log,
    }
    if auth:
        config["auth"] = auth
    service = ServiceProcess(config, tmp_path)
    service.wait_healthy(timeout=30)
    return service


def test_json_logs_one_object_per_line_with_an_access_line(tmp_path, upstream):
    service = run_service(tmp_path, upstream, {"format": "json"}, {"api_keys": ["s3cret-key"]})
    try:
        auth = {"Authorization": "Bearer s3cret-key", "X-Request-Id": "log-1"}
        httpx.post(
            service.url + "/chat/completions", headers=auth, json={"prompt": "my private question"}
        )
        httpx.post(
            service.url + "/v1/chat/completions",
            headers={"Authorization": "Bearer no"},
            json={"messages": HI},
        )
        assert service.terminate()[0] == 0
        lines = [json.loads(line) for line in service.log().splitlines() if line.strip()]
    finally:
        service.kill_all()
    access = [x for x in lines if x["logger"] == "tide_vllm.access"]
    mine = [x for x in access if x["request_id"] == "log-1"]
    assert len(mine) == 1
    assert mine[0] | {"duration_ms": 0} == mine[0] | {
        "method": "POST",
        "path": "/chat/completions",
        "status": 200,
        "shape": "tide",
        "model": MODEL,
        "prompt_tokens": 9,
        "completion_tokens": 5,
        "duration_ms": 0,
    }
    assert "engine" not in mine[0], "one engine: nothing was chosen"
    assert any(x["status"] == 401 for x in access)
    text = service.log()
    assert "my private question" not in text, "prompts are logged only when asked"
    assert "s3cret-key" not in text, "API keys are never logged"
    assert any("no API key configured" in x["message"] for x in lines) is False


def test_text_logs_carry_the_request_id_and_prompts_when_asked(tmp_path, upstream):
    service = run_service(tmp_path, upstream, {"log_prompts": True})
    try:
        httpx.post(
            service.url + "/chat/completions",
            headers={"X-Request-Id": "log-2"},
            json={"prompt": "please log me"},
        )
        service.terminate()
    finally:
        service.kill_all()
    mine = [line for line in service.log().splitlines() if "[log-2]" in line]
    assert any("please log me" in line for line in mine)
    assert any("POST /chat/completions 200" in line for line in mine)
    assert "no API key configured" in service.log()
