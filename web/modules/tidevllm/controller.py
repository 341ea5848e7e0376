"""HTTP routes besides chat: health, readiness, metrics and models. Errors are raised and
turned into responses by the handlers in errors.py. The two chat routes, the hot path, are a
plain ASGI endpoint of their own (chat.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tide_vllm.application.application import Application
from tide_vllm.application.engines import FleetHealth
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


def _engines_body(health: FleetHealth) -> list[dict[str, Any]]:
    return [
        {"name": v.name, "model": v.model, "state": v.state, "healthy": v.healthy,
         "detail": v.detail}
        for v in health.engines
    ]  # fmt: skip


@router.get("/health", response_model=HealthResponse)
async def health(app: App) -> JSONResponse:
    status = await app.health()
    body = HealthResponse(
        status="healthy" if status.healthy else (status.detail or status.state),
        vllm_healthy=status.healthy,
        vllm_state=status.state,
        engines=_engines_body(status),
    )
    return JSONResponse(body.model_dump(), status_code=200 if status.healthy else 503)


@router.get("/ready", summary="Readiness probe: 200 once every model has a ready engine, else 503")
async def ready(app: App) -> JSONResponse:
    status = await app.health()
    body = {"ready": status.healthy, "status": "ready" if status.healthy else status.detail}
    return JSONResponse(body, status_code=200 if status.healthy else 503)


@router.get("/metrics", summary="tide-vllm's Prometheus metrics")
async def metrics(request: Request, app: App) -> Response:
    await app.health()  # fresh: in manual mode this asks vLLM, for tide_vllm_vllm_up
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/vllm", summary="vLLM's own Prometheus metrics, relayed")
async def vllm_metrics(
    app: App,
    engine: Annotated[
        str | None, Query(description="The engine's name; the first by default")
    ] = None,
) -> Response:
    return Response(await app.chat.engine_metrics(engine), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", summary="The served models, each once")
async def models(request: Request, app: App) -> Response:
    request.state.shape = OPENAI_SHAPE
    return Response(await app.chat.models(), media_type="application/json")


@router.get("/admin/engines", summary="Each engine: state, load, requests in flight, hit rates")
async def engines(app: App) -> JSONResponse:
    views = app.engines.views()
    return JSONResponse(
        {
            "policy": app.engines.policy,
            "kv_events": app.engines.kv_events,
            "tokenize_failures": app.engines.tokenize_failures if app.engines.kv_events else None,
            "engines": [view.as_dict() for view in views],
        }
    )


@router.post("/admin/engines/{name}/drain", summary="The engine takes no new requests")
async def drain(name: str, app: App) -> JSONResponse:
    return JSONResponse(app.engines.drain(name).as_dict())


@router.post("/admin/engines/{name}/resume", summary="The engine takes requests again")
async def resume(name: str, app: App) -> JSONResponse:
    return JSONResponse(app.engines.resume(name).as_dict())
