"""The two chat routes, `POST /chat/completions` and `POST /v1/chat/completions`, as one plain
ASGI endpoint.

They are the gateway's hot path, so the gateway hands them here directly instead of through
FastAPI's routing, request objects, dependency solving and exception middleware (together a
fifth of the CPU time of a relayed request). Everything else stays in controller.py. The
OpenAPI schema still documents them (`openapi_paths`).

The shape you send is the shape you get: a body with `prompt` is the spec's (Tide) request and
gets the spec's response; a body with `messages` is an OpenAI chat request and gets vLLM's
OpenAI answer, carried unchanged. Errors get the shape of the request (errors.py), never a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from tide_vllm.application.application import Application
from tide_vllm.domain.chat.entity import ChatDelta, ChatError, ChatResult, InvalidChatRequest
from web.gateway import REQUEST_ID, Lifecycle, valid_request_id
from web.metrics import Metrics

from .errors import (
    CLIENT_CLOSED_REQUEST,
    OPENAI_SHAPE,
    TIDE_SHAPE,
    ClientDisconnected,
    RequestRejected,
    count_upstream_error,
    error_body,
    openai_error_body,
    param_and_kind,
    rejection_headers,
    status_of,
)
from .schemas import TideChatRequest, TideChatResponse, usage_body

T = TypeVar("T")

CHAT_PATHS = {"/chat/completions": TIDE_SHAPE, "/v1/chat/completions": OPENAI_SHAPE}
_SUMMARIES = {TIDE_SHAPE: "Chat (the spec's path)", OPENAI_SHAPE: "Chat (OpenAI-compatible path)"}
JSON = b"application/json"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
DONE = b"data: [DONE]\n\n"
_BOM = b"\xef\xbb\xbf"
# A request still running after this long gets a task watching for its client leaving.
WATCH_AFTER = 0.05
# An OpenAI chunk whose delta carries text, and one that carries the usage.
_TEXT_DELTA = re.compile(rb'"delta":\s*\{[^}]*"content":\s*"[^"]')
_USAGE = re.compile(rb'"usage":\s*\{')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
log = logging.getLogger("tide_vllm.chat")
errors_log = logging.getLogger("tide_vllm.web")


class Endpoint:
    """What the chat and the relay endpoints share: the app they serve (`application`, set by
    the app's lifespan), the limits a request meets before its work (`read_body`, `slot`), the
    disconnect watchdog of the running loop, and one way from errors to answers, in the shape
    the request noted (`scope["state"]["shape"]`), never a traceback."""

    def __init__(
        self,
        metrics: Metrics,
        lifecycle: Lifecycle,
        *,
        max_body_bytes: int,
        max_concurrent_requests: int,
        body_timeout: float,
    ) -> None:
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.max_body_bytes = max_body_bytes
        self.max_requests = max_concurrent_requests
        self.body_timeout = body_timeout
        self.application: Application | None = None
        self.default_model = ""
        self._watchdog: _Watchdog | None = None

    async def handle(self, exchange: _Exchange, app: Application) -> None:
        """The request's work; errors are the caller's to answer."""
        raise NotImplementedError

    async def read_body(self, read: Awaitable[T]) -> T:
        return await within_body_timeout(self.body_timeout, read)

    def slot(self) -> contextlib.AbstractContextManager[None]:
        return request_slot(self.lifecycle, self.max_requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watchdog = self._watchdog
        if watchdog is None or watchdog.loop is not asyncio.get_running_loop():
            watchdog = self._watchdog = _Watchdog(asyncio.get_running_loop())
        exchange = _Exchange(scope, receive, send, watchdog)
        try:
            app = self.application
            if app is None:
                raise RuntimeError(f"{type(self).__name__} was called before the app started")
            await self.handle(exchange, app)
        except ClientDisconnected:
            if not exchange.started:
                await exchange.respond(CLIENT_CLOSED_REQUEST, b"")
        except ChatError as exc:
            count_upstream_error(self.metrics, exc)
            status = status_of(exc)
            if status >= 500:
                errors_log.warning(
                    "%s %s -> %d: %s", scope["method"], scope["path"], status, exc.message
                )
            await self._error(exchange, status, exc.message, *param_and_kind(exc))
        except RequestRejected as exc:
            message = f"{exc.param}: {exc.message}"
            extra = rejection_headers(exc.status)
            await self._error(exchange, exc.status, message, exc.param, None, extra)
        except Exception:
            errors_log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            await self._error(exchange, 500, "internal error in tide-vllm; see its log")

    async def _error(
        self,
        exchange: _Exchange,
        status: int,
        message: str,
        param: str | None = None,
        kind: str | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if exchange.started:  # a stream already under way ends with an error event instead
            return
        state = exchange.state
        body = error_body(
            state.get("shape"), status, message, param, kind, state["request_id"],
            self.default_model,
        )  # fmt: skip
        await exchange.respond(status, orjson.dumps(body), JSON, extra)


class ChatEndpoint(Endpoint):
    """ASGI app for the chat paths. `default_model` is set by the app's lifespan; the request's
    `scope["state"]` (from the gateway) carries its id and collects what the access log and the
    metrics report: shape, model, usage, time of the first token."""

    def __init__(
        self,
        metrics: Metrics,
        lifecycle: Lifecycle,
        *,
        max_body_bytes: int,
        max_concurrent_requests: int,
        body_timeout: float,
        log_prompts: bool,
    ) -> None:
        super().__init__(
            metrics,
            lifecycle,
            max_body_bytes=max_body_bytes,
            max_concurrent_requests=max_concurrent_requests,
            body_timeout=body_timeout,
        )
        self.log_prompts = log_prompts

    async def handle(self, exchange: _Exchange, app: Application) -> None:
        scope, state = exchange.scope, exchange.state
        state["shape"] = CHAT_PATHS[scope["path"]]
        if scope["method"] != "POST":
            raise RequestRejected(405, "method", f"{scope['method']} is not allowed; use POST")
        body = await self.read_body(exchange.read_json_object(self.max_body_bytes))
        # A body with `messages` is OpenAI's request on every chat path, whatever else it
        # holds; only one with no `messages` is the spec's.
        has_messages = "messages" in body
        state["shape"] = OPENAI_SHAPE if has_messages else TIDE_SHAPE
        with self.slot():
            if has_messages:
                await self._openai_chat(exchange, app, body)
            else:
                await self._tide_chat(exchange, app, body)

    # -- the request ----------------------------------------------------------------------
    async def _openai_chat(
        self, exchange: _Exchange, app: Application, body: dict[str, Any]
    ) -> None:
        state = exchange.state
        state["shape"] = OPENAI_SHAPE
        if b"x-request-id" not in state["headers"]:
            # vLLM's own body field names the request when no header does.
            given = valid_request_id(body.get("request_id"))
            if given:
                state["request_id"] = given
                REQUEST_ID.set(given)
        chat = app.factory.from_openai(body, state["request_id"], _session_of(state))
        state["model"] = chat.model
        if self.log_prompts:
            log.info("messages: %s", orjson.dumps(body.get("messages")).decode())
        if chat.stream:
            events = app.chat.relay_stream(chat)
            relay = self._relay(exchange, events, _openai_error_event, _note_openai_event)
            await exchange.until_disconnect(relay)
            return
        raw = await exchange.until_disconnect(app.chat.relay(chat))
        state["usage"] = _usage_of(raw)
        if self.log_prompts:
            log.info("completion: %s", raw.decode(errors="replace"))
        await exchange.respond(200, raw, JSON)

    async def _tide_chat(self, exchange: _Exchange, app: Application, body: dict[str, Any]) -> None:
        state = exchange.state
        state["shape"] = TIDE_SHAPE
        given = valid_request_id(body.get("request_id"))
        if given:  # the body's id wins, in the header and the log too
            state["request_id"] = given
            REQUEST_ID.set(given)
        tide = parse(TideChatRequest, body)
        chat = app.factory.from_prompt(
            tide.prompt,
            system_prompt=tide.system_prompt,
            request_id=state["request_id"],
            max_tokens=tide.max_tokens,
            temperature=tide.temperature,
            top_p=tide.top_p,
            session_id=_session_of(state),
        )
        state["model"] = chat.model
        if self.log_prompts:
            log.info("prompt: %s", tide.prompt)
        if tide.stream:
            render = _TideEvents(state, chat.model)
            error_event = _tide_error_event(chat.request_id, chat.model)
            relay = self._relay(exchange, app.chat.stream(chat), error_event, render=render)
            await exchange.until_disconnect(relay)
            return
        result: ChatResult = await exchange.until_disconnect(app.chat.handle(chat))
        state["usage"] = (result.usage.prompt_tokens, result.usage.completion_tokens)
        if self.log_prompts:
            log.info("completion: %s", result.content)
        answer = TideChatResponse.body_of(result)
        await exchange.respond(200, orjson.dumps(answer), JSON)

    async def _relay(
        self,
        exchange: _Exchange,
        events: AsyncIterator[Any],
        error_event: Callable[[ChatError], bytes],
        note: Callable[[dict[str, Any], bytes], None] | None = None,
        render: Callable[[Any], bytes] | None = None,
    ) -> None:
        """An event stream, each event sent as it comes (`render` makes the events' bytes of
        what comes, if it is not bytes already; `note` sees each first). Errors before the
        first event are ordinary error responses (status and body); after it, an error event
        then `[DONE]`, never a silently cut stream. Run under `until_disconnect`: a client that
        goes away cancels it, and the events are closed, which closes the upstream request."""
        send = exchange.send
        ended = False  # `data: [DONE]` went out as the body's last part
        try:
            async for item in events:
                if ended:
                    continue  # nothing follows [DONE]; read on so the connection can be reused
                # The first event is empty: vLLM accepted the request. The head leaves with
                # the next write, or at the end of this turn if the first token is not in yet.
                if not exchange.started:
                    await exchange.start(200, SSE_HEADERS)
                event = item if render is None else render(item)
                if not event:
                    continue
                if note is not None:
                    note(exchange.state, event)
                # The block ending in [DONE] also ends the body: one write fewer per stream.
                ended = exchange.completed = event.endswith(DONE)
                await send({"type": "http.response.body", "body": event, "more_body": not ended})
        except Exception as exc:
            if not exchange.started:
                raise
            if ended:
                return
            if isinstance(exc, ChatError):
                count_upstream_error(self.metrics, exc)
            else:  # never a silently cut stream, even for a bug of ours
                errors_log.exception("unexpected error in a stream on %s", exchange.scope["path"])
                exc = ChatError("internal error in tide-vllm; see its log")
            await send({"type": "http.response.body", "body": error_event(exc), "more_body": True})
            await send({"type": "http.response.body", "body": DONE})
        else:
            if ended:
                return
            if not exchange.started:
                await exchange.start(200, SSE_HEADERS)
            # A stream that ended without [DONE]: a Tide stream still ends with it.
            await send({"type": "http.response.body", "body": b"" if render is None else DONE})
        finally:
            await events.aclose()  # type: ignore[attr-defined]


async def within_body_timeout(timeout: float, read: Awaitable[T]) -> T:
    """A request body's read, bounded by `web.body_timeout`: 408 after it."""
    try:
        async with asyncio.timeout(timeout):
            return await read
    except TimeoutError:
        raise RequestRejected(
            408, "body", f"not complete within web.body_timeout={timeout:g}s"
        ) from None


@contextlib.contextmanager
def request_slot(lifecycle: Lifecycle, limit: int) -> Iterator[None]:
    """One of `web.max_concurrent_requests` slots for the request's work (429 when none is
    free), taken once its body is in: clients trickling their bodies hold connections, not
    slots."""
    if lifecycle.chats_in_flight >= limit:
        raise RequestRejected(
            429,
            "web.max_concurrent_requests",
            f"too many requests in flight (web.max_concurrent_requests={limit}); retry shortly",
        )
    lifecycle.chats_in_flight += 1
    try:
        yield
    finally:
        lifecycle.chats_in_flight -= 1


class _Exchange:
    """One request and its response on the ASGI interface. The response carries the request's
    id (`x-request-id`) and its status is noted in the state for the access log."""

    __slots__ = (
        "scope", "receive", "send", "state", "started", "completed", "_disconnected", "_watcher",
        "_watchdog",
    )  # fmt: skip

    def __init__(self, scope: Scope, receive: Receive, send: Send, watchdog: _Watchdog) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self._watchdog = watchdog
        self.state: dict[str, Any] = scope["state"]
        self.started = False
        self.completed = False  # the response's last part was sent (receive now says disconnect)
        self._disconnected = False
        self._watcher: asyncio.Task[None] | None = None

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        state = self.state
        state["status"] = status
        headers = [*headers, (b"x-request-id", state["request_id"].encode())]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def respond(
        self,
        status: int,
        body: bytes,
        media_type: bytes | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [(b"content-length", str(len(body)).encode())]
        if media_type:
            headers.append((b"content-type", media_type))
        if extra:
            headers.extend(extra)
        await self.start(status, headers)
        await self.send({"type": "http.response.body", "body": body})

    async def read_json_object(self, limit: int) -> dict[str, Any]:
        """The body as a JSON object: one parse, with the size capped while it is read."""
        headers: dict[bytes, bytes] = self.state["headers"]  # the gateway's, a dict
        content_type = headers.get(b"content-type")
        if content_type is not None and content_type != JSON:
            media = content_type.split(b";", 1)[0].strip().lower().decode("latin-1")
            if media != "application/json" and not media.endswith("+json"):
                raise RequestRejected(
                    415, "Content-Type", f"must be application/json, not {media!r}"
                )
        raw = await self.read_body(limit)
        if raw.startswith(_BOM):  # vLLM accepts a body that starts with one: so do we
            raw = raw[len(_BOM) :]
        if not raw:
            raise InvalidChatRequest("body", "a JSON object is required")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if _not_utf8(raw):
                raise InvalidChatRequest("body", "is not valid UTF-8") from None
            raise InvalidChatRequest("body", f"invalid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidChatRequest("body", "must be a JSON object")
        return body

    async def read_body(self, limit: int) -> bytes:
        """The whole body, its size capped while it is read (413 above `limit`)."""
        length = self.state["headers"].get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestRejected(413, "body", f"larger than the limit of {limit} bytes")
        raw = b""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            raw += message.get("body", b"")
            if len(raw) > limit:
                raise RequestRejected(413, "body", f"larger than the limit of {limit} bytes")
            if not message.get("more_body", False):
                return raw

    async def until_disconnect(self, work: Awaitable[T]) -> T:
        """Run `work` in this task, cancelling it if the client disconnects first (which
        closes the upstream request, so vLLM aborts the generation). The disconnect is
        watched by a task that waits on `receive` (the body has been read, so its next
        message is the disconnect), started only once the work has lasted WATCH_AFTER (the
        watchdog's): most answers from a fast upstream come sooner, and a task per request
        costs more than the rest of the gateway's work on it (a tenth of its CPU time)."""
        task = asyncio.current_task()
        assert task is not None
        watchdog = self._watchdog
        watchdog.add(self, task)
        try:
            result = await work
        except asyncio.CancelledError:
            if self._disconnected and task.uncancel() == 0:
                raise ClientDisconnected() from None
            raise
        finally:
            watchdog.discard(self)
            if self._watcher is not None:
                self._watcher.cancel()
        if self._disconnected:  # the work ended anyway; withdraw the watcher's cancellation
            task.uncancel()
            raise ClientDisconnected()
        return result

    def _start_watching(self, task: asyncio.Task[Any]) -> None:
        self._watcher = self._watchdog.loop.create_task(self._watch(task))

    async def _watch(self, task: asyncio.Task[Any]) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if self.completed:
            return
        self._disconnected = True
        task.cancel()


class _Watchdog:
    """Starts the disconnect watcher of each request that has run WATCH_AFTER (to 1.5 times
    that): one timer for all the requests of a loop, ticking while any runs, instead of a
    timer armed and cancelled for each."""

    __slots__ = ("loop", "_running", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._running: dict[_Exchange, tuple[float, asyncio.Task[Any]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, exchange: _Exchange, task: asyncio.Task[Any]) -> None:
        self._running[exchange] = (self.loop.time(), task)
        if self._timer is None:
            self._timer = self.loop.call_later(WATCH_AFTER / 2, self._tick)

    def discard(self, exchange: _Exchange) -> None:
        self._running.pop(exchange, None)

    def _tick(self) -> None:
        self._timer = None
        running = self._running
        due = self.loop.time() - WATCH_AFTER
        for exchange in [e for e, (since, _) in running.items() if since <= due]:
            _, task = running.pop(exchange)
            exchange._start_watching(task)
        if running:
            self._timer = self.loop.call_later(WATCH_AFTER / 2, self._tick)


def _session_of(state: dict[str, Any]) -> str | None:
    """`X-Session-Id`: the caller's hint that requests belong to one conversation."""
    session = state["headers"].get(b"x-session-id")
    return session.decode("latin-1") if session else None


def _usage_of(raw: bytes) -> tuple[int, int] | None:
    """Token counts of a relayed answer, for the metrics and the access log, read after its
    last `"usage": {` key without parsing the whole answer a second time (text inside JSON
    strings has its quotes escaped, so only a real key matches)."""
    start = None
    for start_match in _USAGE.finditer(raw):
        start = start_match.end()
    if start is None:
        return None
    prompt = _PROMPT_TOKENS.search(raw, start)
    completion = _COMPLETION_TOKENS.search(raw, start)
    return (
        int(prompt.group(1)) if prompt else 0,
        int(completion.group(1)) if completion else 0,
    )


def _note_openai_event(state: dict[str, Any], event: bytes) -> None:
    """When the first text arrives and the usage, from vLLM's event blocks (relayed as they
    are)."""
    if "first_token_at" not in state and _TEXT_DELTA.search(event):
        state["first_token_at"] = time.perf_counter()
    usage = _usage_of(event)
    if usage is not None:
        state["usage"] = usage


class _TideEvents:
    """The Tide stream's events, one per text delta, in the response's own shape; the events
    of deltas that arrived together are one block. The last event has empty content, the
    finish reason and the usage, and goes out with `[DONE]` (text deltas never carry a finish
    reason or usage).

    A text event differs from the next only in its content, so its bytes are the stream's
    two fixed parts around the content's JSON string, instead of a dict built and dumped per
    event (0.69 → 0.52 µs an event here). The last event is dumped whole; a unit test checks
    that the two ways give the same bytes."""

    __slots__ = ("state", "request_id", "model", "_before", "_after", "_first")

    def __init__(self, state: dict[str, Any], model: str) -> None:
        self.state = state
        self.request_id: str = state["request_id"]
        self.model = model
        self._before = b'data: {"request_id":' + orjson.dumps(self.request_id) + b',"content":'
        self._after = (
            b',"model":' + orjson.dumps(model) + b',"usage":null,"finish_reason":null,'
            b'"error":null}\n\n'
        )
        self._first = True  # no text has gone out yet

    def __call__(self, deltas: list[ChatDelta]) -> bytes:
        events = []
        for delta in deltas:
            if delta.content and delta.finish_reason is None and delta.usage is None:
                if self._first:
                    self._first = False
                    self.state["first_token_at"] = time.perf_counter()
                events.append(self._before + orjson.dumps(delta.content) + self._after)
                continue
            events.append(self.last_event(delta))
            if delta.finish_reason is not None or delta.usage is not None:
                events.append(DONE)
                break
        return b"".join(events)

    def last_event(self, delta: ChatDelta) -> bytes:
        """An event dumped from all its fields: the last, with the finish reason and the
        usage."""
        event = {
            "request_id": self.request_id,
            "content": delta.content,
            "model": self.model,
            "usage": None,
            "finish_reason": delta.finish_reason,
            "error": None,
        }
        if delta.content and self._first:
            self._first = False
            self.state["first_token_at"] = time.perf_counter()
        if delta.usage is not None:
            u = delta.usage
            self.state["usage"] = (u.prompt_tokens, u.completion_tokens)
            event["usage"] = usage_body(u)
        return b"data: " + orjson.dumps(event) + b"\n\n"


def _openai_error_event(exc: ChatError) -> bytes:
    return b"data: " + orjson.dumps(openai_error_body(exc)) + b"\n\n"


def _tide_error_event(request_id: str, model: str) -> Callable[[ChatError], bytes]:
    def event(exc: ChatError) -> bytes:
        body = TideChatResponse.failure(request_id, model, exc.message).model_dump()
        return b"data: " + orjson.dumps(body) + b"\n\n"

    return event


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def parse(model: type[TideChatRequest], body: dict[str, Any]) -> TideChatRequest:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidChatRequest(field, message) from None


# -- the OpenAPI description of the two routes --------------------------------------------------
_CHAT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/TideChatRequest"},
                    {
                        "title": "OpenAIChatRequest",
                        "type": "object",
                        "required": ["messages"],
                        "properties": {
                            "messages": {"type": "array", "items": {"type": "object"}},
                            "model": {"type": "string"},
                            "stream": {"type": "boolean"},
                        },
                        "additionalProperties": True,
                    },
                ]
            }
        }
    },
}


def openapi_components() -> dict[str, Any]:
    """The schemas the chat routes refer to, for the OpenAPI document's components: each
    model and the models inside it, referred to as `#/components/schemas/<name>`."""
    schemas: dict[str, Any] = {}
    for model in (TideChatRequest, TideChatResponse):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def openapi_paths() -> dict[str, Any]:
    """The two chat routes for the app's OpenAPI schema (they are not FastAPI routes)."""
    answer = {
        "200": {
            "description": "The answer: the Tide shape for `prompt`, vLLM's for `messages`; "
            "with `stream`, server-sent events",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/TideChatResponse"}}
            },
        }
    }
    return {
        path: {
            "post": {
                "summary": _SUMMARIES[shape],
                "operationId": f"chat_{shape}",
                "requestBody": _CHAT_BODY,
                "responses": answer,
            }
        }
        for path, shape in CHAT_PATHS.items()
    }
