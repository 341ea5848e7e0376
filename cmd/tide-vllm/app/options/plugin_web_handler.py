"""The web server: builds the FastAPI app around the provider and serves it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from tide_vllm.domain.chat.factory import ChatDefaults
from tide_vllm.domain.chat.repository import EngineMonitor
from tide_vllm.provider.provider import ProviderSettings, open_provider
from web.gateway import ApiKeys, GatewayMiddleware, Lifecycle
from web.metrics import Metrics
from web.modules.tidevllm.chat import ChatEndpoint, openapi_paths
from web.modules.tidevllm.controller import router
from web.modules.tidevllm.errors import install_error_handlers

from .http_protocol import GatewayHttpProtocol
from .options import Config
from .workers import WorkerPool

log = logging.getLogger("tide_vllm.web")


def provider_settings(config: Config, upstream_api_key: str | None = None) -> ProviderSettings:
    v = config.vllm
    return ProviderSettings(
        base_url=v.base_url,
        timeout=v.timeout,
        api_key=upstream_api_key or v.api_key,
        pool_size=config.web.max_concurrent_requests + 16,  # chats, plus probes and models
        defaults=ChatDefaults(
            model=v.model_name,
            system_prompt=config.chat.system_prompt,
            max_tokens=v.max_tokens,
            temperature=v.temperature,
            top_p=v.top_p,
        ),
    )


def build_app(
    settings: ProviderSettings,
    monitor: EngineMonitor | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    *,
    max_body_bytes: int = 8 * 1024 * 1024,
    max_concurrent_requests: int = 1024,
    api_keys: Sequence[str] = (),
    cors_origins: Sequence[str] = (),
    log_prompts: bool = False,
) -> FastAPI:
    """The ASGI app; its lifespan opens the provider (and its shared HTTP client).

    Requests pass, in order: CORS (when configured, so preflights are answered before the key
    check), the gateway middleware (drain, keys, ids, limits, metrics, access log), then the
    chat endpoint for the two chat paths, or FastAPI (errors, routing) for the rest."""
    metrics = Metrics()
    chat = ChatEndpoint(metrics, max_body_bytes=max_body_bytes, log_prompts=log_prompts)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_provider(settings, monitor, transport) as provider:
            app.state.provider = provider
            chat.application = provider.application
            chat.default_model = settings.defaults.model
            engine = provider.application.monitor
            metrics.watch_engine(
                up=lambda: engine.current().healthy,
                restarts=lambda: getattr(engine, "total_restarts", 0),
            )
            yield
            chat.application = None

    app = FastAPI(
        title="tide-vllm",
        description="One stable chat endpoint in front of vLLM.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.lifecycle = Lifecycle()
    app.include_router(router)
    install_error_handlers(app)
    _document_chat(app)
    edge: ASGIApp = GatewayMiddleware(
        app.build_middleware_stack(),
        chat,
        lifecycle=app.state.lifecycle,
        metrics=metrics,
        api_keys=ApiKeys(api_keys),
        max_concurrent_requests=max_concurrent_requests,
    )
    if cors_origins:
        edge = CORSMiddleware(
            edge,
            allow_origins=list(cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
        )
    app.middleware_stack = edge  # Starlette builds the stack itself only when none is set
    return app


def _document_chat(app: FastAPI) -> None:
    """The chat routes in /openapi.json, although they are served by ChatEndpoint."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema["paths"] = {**openapi_paths(), **schema["paths"]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_app_for(
    config: Config, monitor: EngineMonitor | None, upstream_api_key: str | None
) -> FastAPI:
    web = config.web
    return build_app(
        provider_settings(config, upstream_api_key),
        monitor,
        max_body_bytes=web.max_body_bytes,
        max_concurrent_requests=web.max_concurrent_requests,
        api_keys=config.auth.api_keys,
        cors_origins=web.cors_origins,
        log_prompts=config.log.log_prompts,
    )


# The collector's thresholds while serving (Python's: 700, 10, 10). Requests in flight are
# young objects that die by reference counting within milliseconds; collected every 700
# allocations, they were walked again and again while alive, and promoted to be walked again:
# 8 % of the instructions per request at 32 connections, 6 % at 256 (callgrind).
GC_THRESHOLDS = (10_000, 50, 100)


def freeze_startup_objects() -> None:
    """Move every object alive after start-up (modules, the app, its schemas: a few hundred
    thousand) out of the garbage collector's reach. They live as long as the process, and
    without this each full collection walks them all while requests wait: at 32 connections
    p99 went from ~55 ms to ~25 ms (`make bench`). Then collect less often (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def server_config(app: ASGIApp, **settings: Any) -> uvicorn.Config:
    """uvicorn's settings, for one process or each worker."""
    return uvicorn.Config(
        app,
        log_config=None,
        lifespan="on",
        http=GatewayHttpProtocol,  # uvicorn's connections, a leaner request cycle
        proxy_headers=False,  # no client address is used: X-Forwarded-For is not read
        access_log=False,  # the gateway writes its own access line
        **settings,
    )


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the bootstrap owns SIGTERM/SIGINT, so a clean
    stop exits 0 (uvicorn would re-raise the signal after its shutdown)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebHandlerPlugin:
    name = "web"

    def __init__(self) -> None:
        self.server: _Server | None = None
        self.task: asyncio.Task[None] | None = None
        self.lifecycle = Lifecycle()
        self.pool: WorkerPool | None = None

    async def start(self, ctx: Any) -> None:
        config: Config = ctx.config
        web = config.web
        if not config.auth.api_keys:
            log.warning(
                "no API key configured (auth.api_keys, TIDE_VLLM_API_KEYS): tide-vllm is open "
                "to anyone who can reach port %d",
                web.bind_address.port,
            )
        if web.workers > 1:
            self.pool = WorkerPool(config, ctx.upstream_api_key, ctx.monitor)
            self.pool.start()
            return
        app = build_app_for(config, ctx.monitor, ctx.upstream_api_key)
        self.lifecycle = app.state.lifecycle
        bind = config.web.bind_address
        self.server = _Server(
            server_config(
                app,
                host=bind.host,
                port=bind.port,
                timeout_graceful_shutdown=2,  # requests were drained before (stop)
            )
        )
        self.task = asyncio.get_running_loop().create_task(self._serve(ctx))
        while not self.server.started and not self.task.done():  # noqa: ASYNC110 (uvicorn
            await asyncio.sleep(0.02)  # offers a flag, not an event)
        if self.task.done():
            raise RuntimeError(f"the web server could not start on {bind.host}:{bind.port}")
        freeze_startup_objects()
        log.info("tide-vllm listening on http://%s:%d", bind.host, bind.port)

    async def _serve(self, ctx: Any) -> None:
        assert self.server is not None
        try:
            await self.server.serve()
        except SystemExit:  # uvicorn exits this way when it cannot bind
            pass
        ctx.request_shutdown()

    async def stop(self, ctx: Any) -> None:
        """Drain: new requests get 503 at once, requests in flight (streams included) get up
        to `web.shutdown_grace` to finish; a second SIGINT (ctx.force) cuts that short."""
        grace = ctx.config.web.shutdown_grace
        if self.pool is not None:
            await self.pool.stop(force=bool(ctx.force), grace=grace)
            return
        if self.server is None or self.task is None:
            return
        self.lifecycle.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.lifecycle.in_flight:
            log.info("draining %d request(s) in flight", self.lifecycle.in_flight)
        while self.lifecycle.in_flight and loop.time() < deadline and not ctx.force:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.lifecycle.in_flight:
            log.warning("stopping with %d request(s) still in flight", self.lifecycle.in_flight)
        self.server.should_exit = True
        self.server.force_exit = bool(ctx.force)
        await self.task
