"""The gateway's edge, as one pure ASGI middleware (no per-request task, no body buffering,
unlike BaseHTTPMiddleware): draining on shutdown, API keys, request ids, the concurrency limit,
requests in flight, metrics and the access log. One pass per request keeps its cost low.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tide_vllm.application.engines import ROUTED

from .metrics import Metrics

ACCESS_LOGGER = "tide_vllm.access"
access_log = logging.getLogger(ACCESS_LOGGER)


class AccessLine:
    """One request's access line: its text and, for JSON logs, its fields."""

    __slots__ = (
        "method", "path", "status", "took", "shape", "model", "prompt", "completion", "routed"
    )  # fmt: skip

    def __init__(
        self,
        method: str,
        path: str,
        status: int,
        took: float,
        shape: str,
        model: str | None,
        prompt: int | None,
        completion: int | None,
        routed: Sequence[tuple[str, str]] = (),
    ) -> None:
        """`routed`: the engines of a fleet the request was sent to, in order, each with why
        (a second one when the first could not run it)."""
        self.method, self.path, self.status, self.took = method, path, status, took
        self.shape, self.model, self.prompt, self.completion = shape, model, prompt, completion
        self.routed = routed

    def message(self) -> str:
        text = (
            f"{self.method} {self.path} {self.status} {self.took * 1000:.1f}ms "
            f"shape={self.shape} model={self.model or '-'} "
            f"prompt_tokens={'-' if self.prompt is None else self.prompt} "
            f"completion_tokens={'-' if self.completion is None else self.completion}"
        )
        if not self.routed:
            return text
        engine, reason = self.routed[-1]
        text += f" engine={engine} routing={reason}"
        if len(self.routed) > 1:
            text += f" tried={','.join(e for e, _ in self.routed[:-1])}"
        return text

    def fields(self) -> dict[str, Any]:
        fields = {
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_ms": round(self.took * 1000, 3),
            "shape": self.shape,
            "model": self.model,
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
        }
        if self.routed:
            fields["engine"], fields["routing"] = self.routed[-1]
            fields["tried"] = [e for e, _ in self.routed[:-1]]
        return fields


AccessWriter = Callable[[AccessLine], None]


class _Access:
    """Where access lines go: through the `tide_vllm.access` logger, or, once the service's
    logging is set up (plugin_logs), a writer straight to the log's stream in its format."""

    writer: AccessWriter | None = None


ACCESS = _Access()

_random_bits = random.getrandbits
_UUID4_KEEP = ~(0xF000 << 64 | 0xC000 << 48)  # version and variant bits cleared,
_UUID4_SET = 0x4000 << 64 | 0x8000 << 48  # then set: version 4, RFC 4122 variant
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# A request id travels in HTTP headers: printable ASCII, no space at either end.
REQUEST_ID_PATTERN = r"^[\x21-\x7e](?:[\x20-\x7e]{0,254}[\x21-\x7e])?$"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)

OPEN_PATHS = frozenset({"/health", "/ready"})
CHAT_PATHS = frozenset({"/chat/completions", "/v1/chat/completions"})
# The service's own routes (FastAPI's); any other path is relayed to vLLM (relay.py).
OWN_PATHS = frozenset(
    {*OPEN_PATHS, "/v1/models", "/metrics", "/metrics/vllm", "/docs", "/docs/oauth2-redirect",
     "/redoc", "/openapi.json", "/admin/stats"}
)  # fmt: skip
# The web console (web.console): its page and its files are the service's own and open (static;
# every call the page makes needs the key). With the console off, they are relayed like the rest.
CONSOLE_PAGE = "/"
CONSOLE_FILES = "/console/"
# vLLM 0.32's routes (vllm/entrypoints/): relayed ones keep their path as the metrics' route
# label; any other path is "other", so a scan of random paths cannot grow the label set.
VLLM_ROUTES = frozenset(
    {"/v1/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
     "/v1/embeddings", "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank",
     "/v2/rerank", "/v2/embed", "/tokenize", "/detokenize", "/v1/audio/transcriptions",
     "/v1/audio/translations", "/version", "/ping", "/invocations", "/tokenizer_info",
     "/v1/chat/completions/render", "/v1/completions/render", "/v1/responses/render",
     "/v1/messages/render", "/inference/v1/generate", "/generative_scoring"}
)  # fmt: skip
KNOWN_ROUTES = frozenset({*OWN_PATHS, *CHAT_PATHS, *VLLM_ROUTES, CONSOLE_PAGE, "/admin/engines"})
# Paths under it are the service's own too (the operators' API; FastAPI answers 404 for the
# rest of it, never vLLM).
ADMIN_PREFIX = "/admin/"
# Routes polled every few seconds (probes, scrapes, the console): not in the access log.
QUIET_ROUTES = frozenset({*OPEN_PATHS, "/metrics", "/admin/stats", "/admin/engines"})
_TEMPLATES = (
    (CONSOLE_FILES, "", "/console/{file}"),
    ("/admin/engines/", "/drain", "/admin/engines/{name}/drain"),
    ("/admin/engines/", "/resume", "/admin/engines/{name}/resume"),
    ("/v1/responses/", "/cancel", "/v1/responses/{id}/cancel"),
    ("/v1/responses/", "", "/v1/responses/{id}"),
    ("/v1/models/", "", "/v1/models/{id}"),
)


def route_label(path: str) -> str:
    """The metrics' route label of a path: bounded, whatever paths clients send."""
    if path in KNOWN_ROUTES:
        return path
    for prefix, suffix, label in _TEMPLATES:
        if (
            path.startswith(prefix)
            and path.endswith(suffix)
            and "/" not in path[len(prefix) : len(path) - len(suffix)]
        ):
            return label
    return "other"


SHUTTING_DOWN = "tide-vllm is shutting down"


def new_request_id() -> str:
    """A random UUID4 as text, as `str(uuid.uuid4())` makes it, without its system call per
    id (os.urandom): random's generator, seeded from the OS and reseeded in a forked child,
    makes ids as unique, and request ids are not secrets."""
    h = f"{_random_bits(128) & _UUID4_KEEP | _UUID4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def valid_request_id(value: Any) -> str | None:
    # fullmatch: `$` would also match before a trailing line break, which then ended the
    # response's x-request-id header line.
    return value if isinstance(value, str) and _REQUEST_ID.fullmatch(value) else None


class Lifecycle:
    """Shared by the middleware (which counts) and the bootstrap (which drains)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.chats_in_flight = 0
        self.draining = False
        self.tasks: set[asyncio.Task[Any]] = set()  # the requests in flight, to cut at the end

    def cut_in_flight(self) -> None:
        """Cancel every request still in flight (the end of a drain): a stream ends, its
        upstream request is closed, and the server can stop."""
        for task in list(self.tasks):
            task.cancel()


class ApiKeys:
    """Bearer keys, compared in constant time; never logged."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [key.encode() for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def accepts(self, authorization: bytes | None) -> bool:
        if not authorization or not authorization[:7].lower() == b"bearer ":
            return False
        given = authorization[7:].strip()
        ok = False
        for key in self._keys:  # every key is compared: the time does not tell which matched
            ok |= hmac.compare_digest(given, key)
        return ok


class GatewayMiddleware:
    """In front of everything: the chat paths go straight to `chat` (the hot path, a plain
    ASGI endpoint), everything else to `app` (FastAPI)."""

    def __init__(
        self,
        app: ASGIApp,
        chat: ASGIApp,
        relay: ASGIApp,
        lifecycle: Lifecycle,
        metrics: Metrics,
        api_keys: ApiKeys,
        console: bool = False,
    ) -> None:
        self.app = app
        self.chat = chat
        self.relay = relay
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.api_keys = api_keys
        self._keys_on = api_keys.enabled  # the keys are set at start-up
        # With the console, its page is one more own and open path, and its files a prefix
        # (str.startswith with an empty tuple is False: nothing to test without the console).
        self._own = OWN_PATHS | {CONSOLE_PAGE} if console else OWN_PATHS
        self._open = OPEN_PATHS | {CONSOLE_PAGE} if console else OPEN_PATHS
        self._console_files: tuple[str, ...] = (CONSOLE_FILES,) if console else ()
        # One process: the gauge reads the count when scraped. Several workers: each pushes
        # its own into the shared files, summed when scraped.
        self._push_in_flight = not metrics.read_in_flight(lambda: lifecycle.in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        headers = dict(scope["headers"])
        state: dict[str, Any] = scope.setdefault("state", {})
        given = headers.get(b"x-request-id")
        request_id = None if given is None else valid_request_id(given.decode("latin-1"))
        if request_id is None:
            request_id = new_request_id()
        state["request_id"] = request_id
        state["started"] = started
        state["headers"] = headers
        state["routed"] = routed = []
        token = REQUEST_ID.set(request_id)
        routed_token = ROUTED.set(routed)
        # The chat and relay endpoints add the id, take a slot and note the status themselves.
        if path in CHAT_PATHS:
            endpoint: ASGIApp | None = self.chat
        elif (
            path in self._own
            or path.startswith(ADMIN_PREFIX)
            or path.startswith(self._console_files)
        ):
            endpoint = None
        else:
            endpoint = self.relay
        status = 500
        lifecycle = self.lifecycle
        try:
            if lifecycle.draining or self._keys_on:  # else nothing refuses it: no call to look
                refusal = self._refusal(scope, path, headers)
                if refusal is not None:
                    status = refusal[0]
                    await _send_error(send, path, request_id, *refusal)
                    return
            lifecycle.in_flight += 1
            task = asyncio.current_task()
            if task is not None:
                lifecycle.tasks.add(task)
            if self._push_in_flight:
                self.metrics.in_flight.inc()
            try:
                if endpoint is not None:
                    try:
                        await endpoint(scope, receive, send)
                    finally:
                        status = state.get("status", 500)
                else:

                    async def send_with_id(message: Message) -> None:
                        nonlocal status
                        if message["type"] == "http.response.start":
                            status = message["status"]
                            message["headers"] = [
                                *message.get("headers", ()),
                                (b"x-request-id", state["request_id"].encode()),
                            ]
                        await send(message)

                    await self.app(scope, receive, send_with_id)
            finally:
                lifecycle.in_flight -= 1
                lifecycle.tasks.discard(task)  # type: ignore[arg-type]
                if self._push_in_flight:
                    self.metrics.in_flight.dec()
        finally:
            self._account(scope, state, status, time.perf_counter() - started)
            REQUEST_ID.reset(token)
            ROUTED.reset(routed_token)

    def _refusal(
        self, scope: Scope, path: str, headers: dict[bytes, bytes]
    ) -> tuple[int, str, str | None, list[tuple[bytes, bytes]]] | None:
        """(status, message, param, extra headers) when the request is refused at the door."""
        if self.lifecycle.draining:
            return 503, SHUTTING_DOWN, None, [(b"connection", b"close"), (b"retry-after", b"5")]
        if (
            self.api_keys.enabled
            and path not in self._open
            and not path.startswith(self._console_files)
            and scope["method"] != "OPTIONS"
            and not self.api_keys.accepts(headers.get(b"authorization"))
        ):
            return (
                401,
                "a valid API key is required: Authorization: Bearer <key>",
                None,
                [(b"www-authenticate", b"Bearer")],
            )
        return None

    def _account(self, scope: Scope, state: dict[str, Any], status: int, took: float) -> None:
        path = scope["path"]
        route = route_label(path)
        shape = state.get("shape", "-")
        usage = state.get("usage")
        first_token = state.get("first_token_at")
        if first_token is not None:
            first_token -= state["started"]
        self.metrics.observe(route, shape, status, took, usage, first_token)
        if route in QUIET_ROUTES:
            return  # probes and scrapes every few seconds would drown the access log
        if not access_log.isEnabledFor(logging.INFO):
            return
        prompt, completion = usage if usage else (None, None)
        line = AccessLine(
            scope["method"], path, status, took, shape, state.get("model"), prompt, completion,
            state.get("routed", ()),
        )  # fmt: skip
        if ACCESS.writer is not None:
            ACCESS.writer(line)
            return
        # Logger.info would also look up the caller's file and line, which no line shows.
        record = access_log.makeRecord(
            ACCESS_LOGGER, logging.INFO, "", 0, line.message(), None, None, extra=line.fields()
        )
        access_log.handle(record)


async def _send_error(
    send: Send,
    path: str,
    request_id: str,
    status: int,
    message: str,
    param: str | None,
    extra: list[tuple[bytes, bytes]],
) -> None:
    """An error before the app runs, in the shape the path would use."""
    body: dict[str, Any]
    if path in OPEN_PATHS:
        body = {"status": message, "vllm_healthy": False, "vllm_state": "stopping"}
    elif path == "/chat/completions" and status != 401:  # 401: OpenAI's shape everywhere
        body = {
            "request_id": request_id,
            "content": "",
            "model": "",
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "finish_reason": None,
            "error": message,
        }
    else:
        kind = {401: "AuthenticationError", 429: "RateLimitError"}.get(
            status, "ServiceUnavailableError"
        )
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    raw = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                (b"x-request-id", request_id.encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})
