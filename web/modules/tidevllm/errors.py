"""Errors become HTTP here: the error bodies, and the handlers registered once on the app for
the routes FastAPI serves (the chat endpoint, chat.py, uses the same bodies itself).

A Tide request gets the spec's response shape with the message in `error`; anything else gets
OpenAI's `{"error": {"message", "type", "param", "code"}}`. No response carries a traceback.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tide_vllm.domain.chat.entity import (
    ChatError,
    EngineFailed,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    InvalidChatRequest,
    ModelNotFound,
)
from tide_vllm.domain.fleet import UnknownEngine
from web.metrics import Metrics

from .schemas import TideChatResponse

log = logging.getLogger("tide_vllm.web")

TIDE_SHAPE = "tide"
OPENAI_SHAPE = "openai"
CLIENT_CLOSED_REQUEST = 499  # nginx's code; nobody reads the response, the access log does


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; the work was cancelled (chat.py)."""


class RequestRejected(Exception):
    """A chat request refused before it is read as a chat: size, media type, method (chat.py)."""

    def __init__(self, status: int, param: str, message: str) -> None:
        super().__init__(message)
        self.status, self.param, self.message = status, param, message


# Headers that go with a refusal before a request is read as a chat or relayed.
_REJECTION_HEADERS: dict[int, list[tuple[bytes, bytes]]] = {
    405: [(b"allow", b"POST")],
    408: [(b"connection", b"close")],  # what is left of the body is not read
    429: [(b"retry-after", b"1")],
}


def rejection_headers(status: int) -> list[tuple[bytes, bytes]]:
    return list(_REJECTION_HEADERS.get(status, ()))


def status_of(exc: ChatError) -> int:
    if isinstance(exc, InvalidChatRequest):
        return 400
    if isinstance(exc, ModelNotFound):
        return 404
    if isinstance(exc, EngineUnavailable):
        return 503
    if isinstance(exc, EngineTimeout):
        return 504
    if isinstance(exc, (EngineRejected, EngineFailed)):
        return exc.status
    return 500


def _openai_type(status: int) -> str:
    return {
        400: "BadRequestError",
        401: "AuthenticationError",
        403: "PermissionDeniedError",
        404: "NotFoundError",
        413: "RequestTooLargeError",
        422: "UnprocessableEntityError",
        429: "RateLimitError",
        503: "ServiceUnavailableError",
        504: "TimeoutError",
    }.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


def param_and_kind(exc: ChatError) -> tuple[str | None, str | None]:
    """The field an error is about, and vLLM's own error type when it rejected the request."""
    if isinstance(exc, ModelNotFound):
        return "model", "NotFoundError"  # as vLLM says it
    param = exc.field if isinstance(exc, InvalidChatRequest) else getattr(exc, "param", None)
    kind = exc.kind if isinstance(exc, EngineRejected) else None
    return param, kind


def openai_error_body(exc: ChatError) -> dict[str, Any]:
    return _openai_body(status_of(exc), exc.message, *param_and_kind(exc))


def _openai_body(status: int, message: str, param: str | None, kind: str | None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": kind or _openai_type(status),
            "param": param,
            "code": status,
        }
    }


def error_body(
    shape: str | None,
    status: int,
    message: str,
    param: str | None,
    kind: str | None,
    request_id: str | None,
    model: str,
) -> dict[str, Any]:
    """The Tide shape for Tide requests (and the spec's path), OpenAI's for everything else."""
    if shape == TIDE_SHAPE:
        return TideChatResponse.failure(
            request_id=request_id or str(uuid.uuid4()), model=model, error=message
        ).model_dump()
    return _openai_body(status, message, param, kind)


def error_response(
    request: Request, status: int, message: str, param: str | None = None, kind: str | None = None
) -> JSONResponse:
    state = request.state
    body = error_body(
        getattr(state, "shape", None),
        status,
        message,
        param,
        kind,
        getattr(state, "request_id", None),
        request.app.state.provider.settings.defaults.model,
    )
    return JSONResponse(body, status_code=status)


_UPSTREAM_KINDS = (
    (EngineUnavailable, "unavailable"),
    (EngineTimeout, "timeout"),
    (EngineRejected, "rejected"),
    (EngineFailed, "failed"),
)


def count_upstream_error(metrics: Metrics, exc: ChatError) -> None:
    """tide_vllm_upstream_errors_total{kind}, for an error of the call to vLLM."""
    for cls, kind in _UPSTREAM_KINDS:
        if isinstance(exc, cls):
            metrics.upstream_errors.labels(kind).inc()
            return


async def _chat_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ChatError)
    count_upstream_error(request.app.state.metrics, exc)
    status = status_of(exc)
    if status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc.message)
    param, kind = param_and_kind(exc)
    return error_response(request, status, exc.message, param=param, kind=kind)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    return error_response(request, 400, f"{field}: {first['msg']}", param=field)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(request, exc.status_code, str(exc.detail))


async def _unknown_engine(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnknownEngine)
    return error_response(request, 404, f"no engine is named {exc.name!r}", param="name")


async def _client_disconnected(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(request, 500, "internal error in tide-vllm; see its log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ChatError, _chat_error)
    app.add_exception_handler(UnknownEngine, _unknown_engine)
    app.add_exception_handler(ClientDisconnect, _client_disconnected)  # left mid-body
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
