"""In-process web tests: the real app, lifespan running, in front of a fake vLLM upstream
(httpx.MockTransport) and a monitor whose status the test sets."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.helpers import READY, SettableMonitor
from tide_vllm.domain.chat.factory import ChatDefaults
from tide_vllm.provider.provider import ProviderSettings
from tide_vllm_cmd.app.options.plugin_web_handler import build_app

MODEL = "Qwen2.5-7B-Instruct"
__all__ = ["READY", "SettableMonitor"]  # the in-process tests take them from here


@dataclass
class FakeUpstream:
    """Answers like vLLM and records what it received; `behaviour` can be swapped per test."""

    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[httpx.Headers] = field(default_factory=list)
    behaviour: Callable[[dict[str, Any]], httpx.Response] | None = None

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL}]})
        if request.url.path != "/v1/chat/completions":  # vLLM's answer to a route it lacks
            return httpx.Response(404, json={"detail": "Not Found"})
        body = json.loads(request.content)
        self.received.append(body)
        self.headers.append(request.headers)
        if self.behaviour:
            return self.behaviour(body)
        return httpx.Response(
            200,
            json={
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Paris."},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22},
            },
        )


@dataclass
class Harness:
    http: httpx.AsyncClient
    upstream: FakeUpstream
    monitor: SettableMonitor


SETTINGS = ProviderSettings(
    base_url="http://vllm.test:8000",
    timeout=5,
    defaults=ChatDefaults(MODEL, "你是一个有用的AI助手。", 2048, 0.7, 0.9),
)


@contextlib.asynccontextmanager
async def serving(app: Any, **client: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client that calls it in process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://tide", **client) as http:
            yield http


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    upstream, monitor = FakeUpstream(), SettableMonitor()
    app = build_app(SETTINGS, monitor, transport=httpx.MockTransport(upstream.handle))
    async with serving(app) as http:
        yield Harness(http, upstream, monitor)
