"""Requests in flight, and draining on shutdown: a pure ASGI middleware (no per-request task
or body buffering, unlike BaseHTTPMiddleware)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

SHUTTING_DOWN = "tide-vllm is shutting down"


class Lifecycle:
    """Shared by the middleware (which counts) and the bootstrap (which drains)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False


class LifecycleMiddleware:
    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            await _refuse(scope, send)
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


async def _refuse(scope: Scope, send: Send) -> None:
    """503 in the shape the route would use, and close the connection."""
    path = scope.get("path", "")
    body: dict[str, Any]
    if path in ("/health", "/ready"):
        body = {"status": SHUTTING_DOWN, "vllm_healthy": False, "vllm_state": "stopping"}
    elif path == "/chat/completions":
        body = {
            "request_id": str(uuid.uuid4()),
            "content": "",
            "model": "",
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "finish_reason": None,
            "error": SHUTTING_DOWN,
        }
    else:
        body = {
            "error": {
                "message": SHUTTING_DOWN,
                "type": "ServiceUnavailableError",
                "param": None,
                "code": 503,
            }
        }
    raw = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                (b"connection", b"close"),
                (b"retry-after", b"5"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})
