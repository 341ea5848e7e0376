"""The composition root: builds the object graph once and owns its resources."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import httpx

from tide_vllm.application.application import Application
from tide_vllm.application.chat_handler import ChatHandler
from tide_vllm.application.discovery import Discovery, Pool, Resolver, url_host
from tide_vllm.application.engines import DrainStore, Engines, RoutingObserver, Upstream
from tide_vllm.application.relay_handler import RelayHandler
from tide_vllm.domain.chat.factory import ChatDefaults, ChatFactory
from tide_vllm.domain.chat.repository import EngineMonitor
from tide_vllm.domain.fleet.kv_events import CacheEvent
from tide_vllm.infrastructure.vllm.discovery import resolve
from tide_vllm.infrastructure.vllm.kv_events import KVEventsReaders, read_endpoints
from tide_vllm.infrastructure.vllm.relay_repository import VLLMRelayRepository
from tide_vllm.infrastructure.vllm.vllm_client import VLLMClient
from tide_vllm.infrastructure.vllm.vllm_repository import VLLMChatRepository, VLLMEngineProbe

DEFAULT_ENGINE = "default"


@dataclass(frozen=True)
class EngineSettings:
    """One engine the gateway sends requests to."""

    name: str
    model: str
    base_url: str
    api_key: str | None = None
    auto_start: bool = False
    health_interval: float = 5.0
    timeout: float | None = None  # None: ProviderSettings.timeout
    kv_events: tuple[str, ...] = ()  # where its KV-cache events are read (precise mode)


@dataclass(frozen=True)
class DiscoverySettings:
    """An entry of `engines:` with `discover: dns://host:port`: one engine per address `host`
    resolves to, each reached at `port` and set up as this entry says."""

    name: str
    model: str
    host: str
    port: int
    api_key: str | None = None
    health_interval: float = 5.0
    timeout: float | None = None
    kv_events: str | None = None  # tcp://*:PORT: each engine's, * (or ::) being its address

    def kv_events_of(self, address: str) -> tuple[str, ...]:
        if self.kv_events is None:
            return ()
        return read_endpoints(self.kv_events, address)


@dataclass(frozen=True)
class ProviderSettings:
    """`base_url` and `api_key` are the engine of a fleet of one, used when `engines` and
    `discovered` are empty; `defaults.model` is the model of requests that name none."""

    base_url: str
    timeout: float
    defaults: ChatDefaults
    api_key: str | None = None
    pool_size: int = 1024
    engines: tuple[EngineSettings, ...] = ()
    policy: str = "prefix"
    discovered: tuple[DiscoverySettings, ...] = ()
    kv_events: bool = False  # precise mode: route on the engines' KV-cache events

    def fleet(self) -> tuple[EngineSettings, ...]:
        """The engines known at start-up (those of `discovered` are found later)."""
        if self.engines or self.discovered:
            return self.engines
        return (EngineSettings(DEFAULT_ENGINE, self.defaults.model, self.base_url, self.api_key),)


@dataclass(frozen=True)
class Provider:
    """Typed, frozen container read by the wiring code and the web layer's dependencies.
    `discovery`: what keeps the discovered engines up to date (its `run()` is the app's to
    start), or None; `kv_events`: the readers of the engines' KV-cache events (precise mode),
    running until the provider closes, or None."""

    settings: ProviderSettings
    application: Application
    discovery: Discovery | None = None
    kv_events: KVEventsReaders | None = None
    _clients: Mapping[Upstream, VLLMClient] = field(default_factory=dict, repr=False)

    @property
    def clients(self) -> dict[str, VLLMClient]:
        """Each engine's HTTP client not closed yet, by the engine's name."""
        return {upstream.name: client for upstream, client in self._clients.items()}


@asynccontextmanager
async def open_provider(
    settings: ProviderSettings,
    monitor: EngineMonitor | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    *,
    monitors: Mapping[str, EngineMonitor] | None = None,
    observer: RoutingObserver | None = None,
    drains: DrainStore | None = None,
    resolver: Resolver = resolve,
) -> AsyncIterator[Provider]:
    """Build the graph; each engine's HTTP client is closed on exit.

    Each engine's monitor is the supervisor's (auto-start) or an external engine's probe from
    `monitors` (by name; `monitor` for a fleet of one); an engine without one is probed here
    (`probe`: the watcher asks it every health interval), as is every engine found by
    discovery. Those are looked for once before the graph is handed out; the client of one
    that leaves is closed once its requests have ended."""
    given = dict(monitors or {})
    fleet = settings.fleet()
    if monitor is not None and fleet:
        given.setdefault(fleet[0].name, monitor)
    made: dict[Upstream, VLLMClient] = {}  # every client not closed yet, by its engine
    engines: Engines | None = None  # once built: the events' readers start before it

    def cache_events(name: str, events: Iterable[CacheEvent]) -> None:
        if engines is not None:
            engines.cache_events(name, events)

    def cache_restarted(name: str) -> None:
        if engines is not None:
            engines.cache_restarted(name)

    readers = KVEventsReaders(cache_events, cache_restarted) if settings.kv_events else None

    def build(engine: EngineSettings, own: EngineMonitor | None = None) -> Upstream:
        client = VLLMClient(
            engine.base_url,
            settings.timeout if engine.timeout is None else engine.timeout,
            api_key=engine.api_key,
            pool_size=settings.pool_size,
            transport=transport,
        )
        upstream = Upstream(
            name=engine.name,
            model=engine.model,
            chat=VLLMChatRepository(client),
            relay=VLLMRelayRepository(client),
            monitor=own or VLLMEngineProbe(client, engine.model),
            base_url=engine.base_url,
            auto_start=engine.auto_start,
            probe=own is None and (len(fleet) > 1 or bool(settings.discovered)),
            health_interval=engine.health_interval,
        )
        made[upstream] = client
        if readers is not None:
            readers.follow(engine.name, engine.kv_events)
        return upstream

    pools = {entry.name: entry for entry in settings.discovered}

    def found(pool: Pool, name: str, address: str) -> Upstream:
        entry = pools[pool.name]
        return build(
            EngineSettings(
                name,
                entry.model,
                f"http://{url_host(address)}:{pool.port}",
                entry.api_key,
                health_interval=entry.health_interval,
                timeout=entry.timeout,
                kv_events=entry.kv_events_of(address),
            )
        )

    async def release(engine: Upstream) -> None:
        if readers is not None:
            await readers.unfollow(engine.name)
        await made.pop(engine).aclose()

    async def close_all() -> None:
        for engine in list(made):
            await release(engine)

    async with AsyncExitStack() as stack:
        stack.push_async_callback(close_all)
        if readers is not None:
            stack.push_async_callback(readers.aclose)
        upstreams = [build(engine, given.get(engine.name)) for engine in fleet]
        factory = ChatFactory(settings.defaults)
        looked_for: dict[str, list[str]] = {}
        for entry in settings.discovered:
            looked_for.setdefault(entry.model, []).append(_pool(entry).url)
        engines = Engines(
            upstreams,
            default_model=settings.defaults.model,
            policy=settings.policy,
            observer=observer,
            drains=drains,
            discovered={model: ", ".join(urls) for model, urls in looked_for.items()},
            kv_events=settings.kv_events,
        )
        discovery = None
        if settings.discovered:
            discovery = Discovery(
                engines, [_pool(e) for e in settings.discovered], resolver, found, release
            )
            stack.push_async_callback(discovery.aclose)
            await discovery.refresh()
        application = Application(
            ChatHandler(engines, factory), factory, engines, RelayHandler(engines)
        )
        yield Provider(settings, application, discovery, readers, made)


def _pool(entry: DiscoverySettings) -> Pool:
    return Pool(entry.name, entry.model, entry.host, entry.port)
