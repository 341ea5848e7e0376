"""HTTP routes besides chat: health, readiness, metrics and models. Errors are raised and
turned into responses by the handlers in errors.py. The two chat routes, the hot path, are a
plain ASGI endpoint of their own (chat.py).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tide_vllm.application.application import Application
from tide_vllm.provider.provider import Provider

from .errors import OPENAI_SHAPE
from .schemas import HealthResponse

router = APIRouter()


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
