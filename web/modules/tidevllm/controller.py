"""HTTP routes: parse, call the application, shape the response. Errors are raised and turned
into responses by the handlers in errors.py.

The shape you send is the shape you get: a body with `prompt` is the spec's (Tide) request and
gets the spec's response; a body with `messages` is an OpenAI chat request and gets vLLM's
OpenAI answer, carried unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from tide_vllm.application.application import Application
from tide_vllm.domain.chat.entity import ChatDelta, ChatError, ChatResult, InvalidChatRequest
from tide_vllm.provider.provider import Provider
from web.gateway import bind_request_id, valid_request_id

from .errors import (
    OPENAI_SHAPE,
    TIDE_SHAPE,
    ClientDisconnected,
    RequestRejected,
    count_upstream_error,
    openai_error_body,
)
from .schemas import HealthResponse, TideChatRequest, TideChatResponse

router = APIRouter()

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
# An OpenAI chunk whose delta carries text, and one that carries the usage.
_TEXT_DELTA = re.compile(rb'"delta":\s*\{[^}]*"content":\s*"[^"]')
_USAGE = re.compile(rb'"usage":\s*\{')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
log = logging.getLogger("tide_vllm.chat")


# Async on purpose: FastAPI runs a sync dependency in a worker thread, a hop per request.
async def get_provider(request: Request) -> Provider:
    provider: Provider = request.app.state.provider
    return provider


async def get_application(provider: Annotated[Provider, Depends(get_provider)]) -> Application:
    return provider.application


App = Annotated[Application, Depends(get_application)]


@router.get("/health", response_model=HealthResponse)
async def health(app: App) -> JSONResponse:
    status = await app.health()
    body = HealthResponse(
        status="healthy" if status.healthy else (status.detail or status.state.value),
        vllm_healthy=status.healthy,
        vllm_state=status.state.value,
    )
    return JSONResponse(body.model_dump(), status_code=200 if status.healthy else 503)


@router.get("/ready", summary="Readiness probe: 200 once vLLM serves the model, else 503")
async def ready(app: App) -> JSONResponse:
    status = await app.health()
    body = {"ready": status.healthy, "status": "ready" if status.healthy else status.detail}
    return JSONResponse(body, status_code=200 if status.healthy else 503)


@router.get("/metrics", summary="tide-vllm's Prometheus metrics")
async def metrics(request: Request, app: App) -> Response:
    await app.health()  # fresh: in manual mode this asks vLLM, for tide_vllm_vllm_up
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/vllm", summary="vLLM's own Prometheus metrics, relayed")
async def vllm_metrics(app: App) -> Response:
    return Response(await app.chat.engine_metrics(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", summary="The served model(s), as vLLM lists them")
async def models(request: Request, app: App) -> Response:
    request.state.shape = OPENAI_SHAPE
    return Response(await app.chat.models(), media_type="application/json")


_CHAT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        TideChatRequest.model_json_schema(),
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
}


async def chat_completions(request: Request) -> Response:
    # The hot path reads the provider directly: FastAPI's dependency solving costs more.
    app: Application = request.app.state.provider.application
    request.state.shape = TIDE_SHAPE if request.url.path == "/chat/completions" else OPENAI_SHAPE
    body = await read_json_object(request)
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt and has_messages:
        raise InvalidChatRequest(
            "prompt", "send either `prompt` (the spec's request) or `messages` (OpenAI's), not both"
        )
    if has_messages:
        return await _openai_chat(request, app, body)
    return await _tide_chat(request, app, body)


for _path, _summary in (
    ("/chat/completions", "Chat (the spec's path)"),
    ("/v1/chat/completions", "Chat (OpenAI-compatible path)"),
):
    router.add_api_route(
        _path,
        chat_completions,
        methods=["POST"],
        summary=_summary,
        openapi_extra=_CHAT_BODY,
        responses={200: {"model": TideChatResponse}},
    )


async def _openai_chat(request: Request, app: Application, body: dict[str, Any]) -> Response:
    state = request.state
    state.shape = OPENAI_SHAPE
    chat = app.factory.from_openai(body, state.request_id)
    state.model = chat.model
    if request.app.state.log_prompts:
        log.info("messages: %s", orjson.dumps(body.get("messages")).decode())
    if chat.stream:
        return await _sse(
            request, _counted_openai(state, app.chat.relay_stream(chat)), _openai_error_event
        )
    raw = await until_disconnect(request, app.chat.relay(chat))
    state.usage = _usage_of(raw)
    if request.app.state.log_prompts:
        log.info("completion: %s", raw.decode(errors="replace"))
    return Response(raw, media_type="application/json")


async def _tide_chat(request: Request, app: Application, body: dict[str, Any]) -> Response:
    state = request.state
    state.shape = TIDE_SHAPE
    given = valid_request_id(body.get("request_id"))
    if given:
        bind_request_id(state, given)  # the body's id wins, in the header and the log too
    tide = parse(TideChatRequest, body)
    chat = app.factory.from_prompt(
        tide.prompt,
        system_prompt=tide.system_prompt,
        request_id=state.request_id,
        max_tokens=tide.max_tokens,
        temperature=tide.temperature,
        top_p=tide.top_p,
    )
    state.model = chat.model
    if request.app.state.log_prompts:
        log.info("prompt: %s", tide.prompt)
    if tide.stream:
        events = _tide_events(state, chat.model, app.chat.stream(chat))
        return await _sse(request, events, _tide_error_event(chat.request_id, chat.model))
    result: ChatResult = await until_disconnect(request, app.chat.handle(chat))
    state.usage = (result.usage.prompt_tokens, result.usage.completion_tokens)
    if request.app.state.log_prompts:
        log.info("completion: %s", result.content)
    return Response(
        orjson.dumps(TideChatResponse.from_result(result).model_dump()),
        media_type="application/json",
    )


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


async def _counted_openai(state: Any, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """vLLM's event blocks unchanged, noting when the first text arrives and the usage."""
    try:
        async for event in events:
            if not getattr(state, "first_token_at", None) and _TEXT_DELTA.search(event):
                state.first_token_at = time.perf_counter()
            usage = _usage_of(event)
            if usage is not None:
                state.usage = usage
            yield event
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def _tide_events(
    state: Any, model: str, deltas: AsyncIterator[ChatDelta]
) -> AsyncIterator[bytes]:
    """The Tide stream: one event per text delta, in the response's own shape; the last event
    has empty content, the finish reason and the usage."""
    request_id = state.request_id
    try:
        async for delta in deltas:
            event = {
                "request_id": request_id,
                "content": delta.content,
                "model": model,
                "usage": None,
                "finish_reason": delta.finish_reason,
                "error": None,
            }
            if delta.content and not getattr(state, "first_token_at", None):
                state.first_token_at = time.perf_counter()
            if delta.usage is not None:
                u = delta.usage
                state.usage = (u.prompt_tokens, u.completion_tokens)
                event["usage"] = {
                    "prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "total_tokens": u.total_tokens,
                }
            yield b"data: " + orjson.dumps(event) + b"\n\n"
        yield DONE
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]


def _openai_error_event(exc: ChatError) -> bytes:
    return b"data: " + orjson.dumps(openai_error_body(exc)) + b"\n\n"


def _tide_error_event(request_id: str, model: str) -> Callable[[ChatError], bytes]:
    def event(exc: ChatError) -> bytes:
        body = TideChatResponse.failure(request_id, model, exc.message).model_dump()
        return b"data: " + orjson.dumps(body) + b"\n\n"

    return event


async def _sse(
    request: Request,
    events: AsyncIterator[bytes],
    error_event: Callable[[ChatError], bytes],
) -> Response:
    """An event stream. Errors before the first event are ordinary error responses (status
    and body); after it, an error event then `[DONE]`, never a silently cut stream. A client
    that goes away cancels the work, which closes the upstream request."""
    try:
        first = await until_disconnect(request, _first(events))
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for event in events:
                yield event
        except ChatError as exc:
            count_upstream_error(request, exc)
            yield error_event(exc)
            yield DONE
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _first(events: AsyncIterator[bytes]) -> bytes:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return b""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first (which closes the upstream
    request, so vLLM aborts the generation)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object: one parse, with the size capped while it is read."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise RequestRejected(415, "Content-Type", f"must be application/json, not {media!r}")
    limit: int = request.app.state.max_body_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestRejected(413, "body", f"larger than the limit of {limit} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise RequestRejected(413, "body", f"larger than the limit of {limit} bytes")
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
