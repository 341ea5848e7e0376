"""The web server: builds the FastAPI app around the provider and serves it with granian."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import httpx
from fastapi import FastAPI
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings, HTTP2Settings
from granian.log import LogLevels
from granian.server.embed import Server
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from tide_vllm.application.discovery import Resolver
from tide_vllm.application.engines import DrainStore
from tide_vllm.domain.chat.factory import ChatDefaults
from tide_vllm.domain.chat.repository import EngineMonitor
from tide_vllm.infrastructure.vllm.discovery import resolve
from tide_vllm.infrastructure.vllm.processes import command_line, listening_pids
from tide_vllm.provider.provider import (
    DiscoverySettings,
    EngineSettings,
    ProviderSettings,
    open_provider,
)
from web.console_stats import StatsSampler
from web.gateway import ApiKeys, GatewayMiddleware, Lifecycle
from web.metrics import Metrics
from web.modules.tidevllm.chat import ChatEndpoint, openapi_components, openapi_paths
from web.modules.tidevllm.console import console_router, stats_router
from web.modules.tidevllm.controller import router
from web.modules.tidevllm.errors import install_error_handlers
from web.modules.tidevllm.relay import RelayEndpoint

from .options import Config, EngineConfig, WebConfig
from .workers import WorkerPool

log = logging.getLogger("tide_vllm.web")


def provider_settings(
    config: Config,
    upstream_api_key: str | None = None,
    engine_configs: Mapping[str, EngineConfig] | None = None,
) -> ProviderSettings:
    """The provider's settings. With `engines:`, each engine as the vLLM plugin left it
    (`engine_configs`: an auto-started one carries the key tide-vllm gave it), and each entry
    that discovers its engines."""
    v = config.vllm
    engines: list[EngineSettings] = []
    discovered: list[DiscoverySettings] = []
    known = engine_configs or {}
    for entry in config.engines or ():
        where = entry.discovered_at
        if where is not None:
            discovered.append(
                DiscoverySettings(
                    name=entry.name,
                    model=entry.model_name,
                    host=where[0],
                    port=where[1],
                    api_key=entry.api_key,
                    health_interval=entry.health_interval,
                    timeout=entry.timeout,
                    kv_events=entry.kv_events_publish,
                )
            )
            continue
        engines.append(
            EngineSettings(
                name=entry.name,
                model=entry.model_name,
                base_url=entry.base_url,
                api_key=known.get(entry.name, entry).api_key,
                auto_start=entry.auto_start,
                health_interval=entry.health_interval,
                timeout=entry.timeout,
                kv_events=entry.kv_events_subscribe(),
            )
        )
    return ProviderSettings(
        base_url=v.base_url,
        timeout=v.timeout,
        api_key=upstream_api_key or v.api_key,
        pool_size=config.web.max_concurrent_requests + 16,  # chats, plus probes and models
        engines=tuple(engines),
        discovered=tuple(discovered),
        policy=config.routing.policy,
        kv_events=config.routing.kv_events and config.engines is not None,
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
    body_timeout: float = 30.0,
    monitors: Mapping[str, EngineMonitor] | None = None,
    drains: DrainStore | None = None,
    console: bool = True,
    resolver: Resolver = resolve,
) -> FastAPI:
    """The ASGI app; its lifespan opens the provider (and its shared HTTP client) and runs the
    engines' watcher, the discovery of engines (`resolver` looks their names up) and the
    sampler of `/admin/stats`. `console`: the web console at `/` (else `/` is relayed).

    Requests pass, in order: CORS (when configured, so preflights are answered before the key
    check), the gateway middleware (drain, keys, ids, limits, metrics, access log), then the
    chat endpoint for the two chat paths, or FastAPI (errors, routing) for the rest."""
    metrics = Metrics()
    lifecycle = Lifecycle()
    started = asyncio.Event()  # set once the lifespan has opened the provider
    stats = StatsSampler(metrics.exposition)
    chat = ChatEndpoint(
        metrics,
        lifecycle,
        max_body_bytes=max_body_bytes,
        max_concurrent_requests=max_concurrent_requests,
        body_timeout=body_timeout,
        log_prompts=log_prompts,
    )
    relay = RelayEndpoint(
        metrics,
        lifecycle,
        max_body_bytes=max_body_bytes,
        max_concurrent_requests=max_concurrent_requests,
        body_timeout=body_timeout,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_provider(
            settings,
            monitor,
            transport,
            monitors=monitors,
            observer=metrics.engines,
            drains=drains,
            resolver=resolver,
        ) as provider:
            app.state.provider = provider
            chat.application = relay.application = provider.application
            chat.default_model = settings.defaults.model
            engines = provider.application.engines
            metrics.watch_engines(
                up=lambda: engines.health().healthy,
                engines=lambda: [(v.name, v.healthy, v.restarts) for v in engines.views()],
            )
            loop = asyncio.get_running_loop()
            tasks = {
                loop.create_task(engines.watch(), name="engines"),
                loop.create_task(stats.run()),
            }
            if provider.discovery is not None:
                tasks.add(loop.create_task(provider.discovery.run(), name="discovery"))
            started.set()
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                chat.application = relay.application = None

    app = FastAPI(
        title="tide-vllm",
        description="One stable chat endpoint in front of vLLM.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.started = started
    app.state.stats = stats
    app.include_router(router)
    app.include_router(stats_router)
    if console:
        app.include_router(console_router())
    install_error_handlers(app)
    _document_chat(app)
    edge: ASGIApp = GatewayMiddleware(
        app.build_middleware_stack(),
        chat,
        relay,
        lifecycle=lifecycle,
        metrics=metrics,
        api_keys=ApiKeys(api_keys),
        console=console,
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
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(openapi_components())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_app_for(
    config: Config,
    monitors: Mapping[str, EngineMonitor] | None,
    upstream_api_key: str | None,
    engine_configs: Mapping[str, EngineConfig] | None = None,
    *,
    drains: DrainStore | None = None,
) -> FastAPI:
    """The app for `config`: `monitors` are the engines' monitors by name (an engine without
    one is probed by the app), `engine_configs` the engines as the vLLM plugin left them."""
    web = config.web
    return build_app(
        provider_settings(config, upstream_api_key, engine_configs),
        max_body_bytes=web.max_body_bytes,
        max_concurrent_requests=web.max_concurrent_requests,
        api_keys=config.auth.api_keys,
        cors_origins=web.cors_origins,
        log_prompts=config.log.log_prompts,
        body_timeout=web.body_timeout,
        monitors=monitors,
        drains=drains,
        console=web.console,
    )


# The collector's thresholds while serving (Python's: 700, 10, 10). Requests in flight are
# young objects that die by reference counting within milliseconds; collected every 700
# allocations, they were walked again and again while alive, and promoted to be walked again:
# 8 % of the instructions per request at 32 connections, 6 % at 256 (callgrind).
GC_THRESHOLDS = (10_000, 50, 100)
MAX_HEAD_BYTES = 64 * 1024  # a request head above it is refused (431)


def freeze_startup_objects() -> None:
    """Move every object alive after start-up (modules, the app, its schemas: a few hundred
    thousand) out of the garbage collector's reach. They live as long as the process, and
    without this each full collection walks them all while requests wait: at 32 connections
    p99 went from ~55 ms to ~25 ms (`make bench`). Then collect less often (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def granian_server(app: ASGIApp, web: WebConfig) -> Server:
    """granian, embedded in this process's event loop, with its own limits on what a client
    may send before the app sees a request: a head over MAX_HEAD_BYTES is answered 431, and a
    head not complete within `web.header_timeout` closes the connection. Both are granian's
    settings; the body's limits (size, `web.body_timeout`) are the app's.

    granian and not uvicorn: uvicorn (0.54, httptools or h11) has no timeout for a request
    head in progress, so a client trickling its headers holds a connection for ever."""
    bind = web.bind_address
    return Server(
        app,
        address=bind.host,
        port=bind.port,
        interface=Interfaces.ASGI,
        http=HTTPModes.auto,
        websockets=False,
        backlog=2048,
        http1_settings=HTTP1Settings(
            header_read_timeout=int(web.header_timeout * 1000), max_buffer_size=MAX_HEAD_BYTES
        ),
        http2_settings=HTTP2Settings(max_headers_size=MAX_HEAD_BYTES),
        # granian's own lines go through tide-vllm's logging (no handler of its own); its
        # start and stop are told by tide-vllm, so only its errors are kept.
        log_level=LogLevels.error,
        log_dictconfig={"loggers": {"_granian": {"propagate": True}}},
    )


async def serve_until_stopped(
    server: Server, lifecycle: Lifecycle, started: asyncio.Event
) -> asyncio.Task[None]:
    """Start `server` in a task; return it once the app's lifespan has started. Raises
    RuntimeError when the server could not start (its port is taken, say)."""
    task = asyncio.get_running_loop().create_task(server.serve())
    waiter = asyncio.ensure_future(started.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not started.is_set():
        waiter.cancel()
        exc = task.exception() if task.done() else None
        raise RuntimeError(f"the web server could not start: {exc or 'it stopped'}")
    return task


async def drain_and_stop(
    server: Server,
    task: asyncio.Task[None],
    lifecycle: Lifecycle,
    grace: float,
    forced: Callable[[], bool] = lambda: False,
) -> None:
    """New requests get 503 at once; requests in flight (streams included) get up to `grace`
    to finish, or until `forced()` says to stop now; what is left is cut; the server stops."""
    lifecycle.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    if lifecycle.in_flight:
        log.info("draining %d request(s) in flight", lifecycle.in_flight)
    while lifecycle.in_flight and loop.time() < deadline and not forced():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if lifecycle.in_flight:
        log.warning("stopping with %d request(s) still in flight", lifecycle.in_flight)
        lifecycle.cut_in_flight()
    server.stop()
    await task


def port_taken(port: int) -> str | None:
    """Who listens on `port` already, or None. granian binds with SO_REUSEPORT (so that
    several workers can share a port), so a second server on a taken port would not fail: it
    would silently share the port with whatever holds it."""
    owners = listening_pids(port)
    if not owners:
        return None
    return ", ".join(f"pid {pid} ({command_line(pid)[:120]})" for pid in owners)


class WebHandlerPlugin:
    name = "web"

    def __init__(self) -> None:
        self.server: Server | None = None
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
        taken = port_taken(web.bind_address.port)
        if taken:
            raise RuntimeError(
                f"web.bind_address.port {web.bind_address.port} is already in use by {taken}"
            )
        caveat = config.workers_routing_caveat()
        if caveat:
            log.warning(caveat)
        if web.workers > 1:
            self.pool = WorkerPool(config, ctx.upstream_api_key, ctx.engines, ctx.engine_configs)
            self.pool.start()
            return
        app = build_app_for(config, ctx.engines, ctx.upstream_api_key, ctx.engine_configs)
        self.lifecycle = app.state.lifecycle
        self.server = granian_server(app, web)
        self.task = await serve_until_stopped(self.server, self.lifecycle, app.state.started)
        self.task.add_done_callback(lambda _: ctx.request_shutdown())
        freeze_startup_objects()
        bind = web.bind_address
        log.info("tide-vllm listening on http://%s:%d", bind.host, bind.port)

    async def stop(self, ctx: Any) -> None:
        """Drain: new requests get 503 at once, requests in flight (streams included) get up
        to `web.shutdown_grace` to finish; a second SIGINT (ctx.force) cuts that short."""
        grace = ctx.config.web.shutdown_grace
        if self.pool is not None:
            await self.pool.stop(force=bool(ctx.force), grace=grace)
            return
        if self.server is None or self.task is None:
            return
        forced = lambda: bool(ctx.force)  # noqa: E731 (a second SIGINT sets it meanwhile)
        await drain_and_stop(self.server, self.task, self.lifecycle, grace, forced)
