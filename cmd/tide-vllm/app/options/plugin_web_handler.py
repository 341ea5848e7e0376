"""The web server: builds the FastAPI app around the provider and serves it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from tide_vllm.domain.chat.factory import ChatDefaults
from tide_vllm.domain.chat.repository import EngineMonitor
from tide_vllm.provider.provider import ProviderSettings, open_provider
from web.lifecycle import Lifecycle, LifecycleMiddleware
from web.modules.tidevllm.controller import router
from web.modules.tidevllm.errors import install_error_handlers

from .options import Config

log = logging.getLogger("tide_vllm.web")


def provider_settings(config: Config) -> ProviderSettings:
    v = config.vllm
    return ProviderSettings(
        base_url=v.base_url,
        timeout=v.timeout,
        api_key=v.api_key,
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
    max_body_bytes: int = 8 * 1024 * 1024,
) -> FastAPI:
    """The ASGI app; its lifespan opens the provider (and its shared HTTP client)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_provider(settings, monitor, transport) as provider:
            app.state.provider = provider
            yield

    app = FastAPI(
        title="tide-vllm",
        description="One stable chat endpoint in front of vLLM.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.max_body_bytes = max_body_bytes
    app.state.lifecycle = Lifecycle()
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(LifecycleMiddleware, lifecycle=app.state.lifecycle)
    return app


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
        self.grace = 0.0

    async def start(self, ctx: Any) -> None:
        config: Config = ctx.config
        app = build_app(
            provider_settings(config), ctx.monitor, max_body_bytes=config.web.max_body_bytes
        )
        self.lifecycle = app.state.lifecycle
        self.grace = config.web.shutdown_grace
        bind = config.web.bind_address
        self.server = _Server(
            uvicorn.Config(
                app,
                host=bind.host,
                port=bind.port,
                log_config=None,
                lifespan="on",
                timeout_graceful_shutdown=2,  # requests were drained before (stop)
            )
        )
        self.task = asyncio.get_running_loop().create_task(self._serve(ctx))
        while not self.server.started and not self.task.done():  # noqa: ASYNC110 (uvicorn
            await asyncio.sleep(0.02)  # offers a flag, not an event)
        if self.task.done():
            raise RuntimeError(f"the web server could not start on {bind.host}:{bind.port}")
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
        if self.server is None or self.task is None:
            return
        self.lifecycle.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        if self.lifecycle.in_flight:
            log.info("draining %d request(s) in flight", self.lifecycle.in_flight)
        while self.lifecycle.in_flight and loop.time() < deadline and not ctx.force:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.lifecycle.in_flight:
            log.warning("stopping with %d request(s) still in flight", self.lifecycle.in_flight)
        self.server.should_exit = True
        self.server.force_exit = bool(ctx.force)
        await self.task
