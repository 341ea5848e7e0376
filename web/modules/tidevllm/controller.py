"""HTTP routes: parse, call the application, shape the response. Errors are raised and turned
into responses by the handlers in errors.py."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from tide_vllm.application.application import Application
from tide_vllm.domain.chat.entity import InvalidChatRequest
from tide_vllm.provider.provider import Provider

from .errors import TIDE_SHAPE
from .schemas import HealthResponse, TideChatRequest, TideChatResponse

router = APIRouter()


def get_provider(request: Request) -> Provider:
    provider: Provider = request.app.state.provider
    return provider


def get_application(provider: Annotated[Provider, Depends(get_provider)]) -> Application:
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


_CHAT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": TideChatRequest.model_json_schema()}},
    }
}


@router.post(
    "/chat/completions",
    response_model=TideChatResponse,
    openapi_extra=_CHAT_BODY,
    summary="Chat (the spec's shape)",
)
@router.post(
    "/v1/chat/completions",
    response_model=TideChatResponse,
    openapi_extra=_CHAT_BODY,
    summary="Chat (OpenAI-compatible path)",
)
async def chat_completions(request: Request, app: App) -> JSONResponse:
    body = await read_json_object(request)
    request.state.shape = TIDE_SHAPE
    request.state.request_id = _given_request_id(body) or app.factory.new_request_id()
    tide = parse(TideChatRequest, body)
    chat = app.factory.from_prompt(
        tide.prompt,
        system_prompt=tide.system_prompt,
        request_id=request.state.request_id,
        max_tokens=tide.max_tokens,
        temperature=tide.temperature,
        top_p=tide.top_p,
    )
    result = await app.chat.handle(chat)
    return JSONResponse(TideChatResponse.from_result(result).model_dump())


async def read_json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        raise InvalidChatRequest("body", "a JSON object is required")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidChatRequest("body", "is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidChatRequest("body", f"invalid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise InvalidChatRequest("body", "JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidChatRequest("body", "must be a JSON object")
    return body


def _given_request_id(body: dict[str, Any]) -> str | None:
    value = body.get("request_id")
    return value if isinstance(value, str) and 0 < len(value) <= 256 else None


def parse(model: type[TideChatRequest], body: dict[str, Any]) -> TideChatRequest:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidChatRequest(field, message) from None
