"""The composition root: builds the object graph once and owns its resources."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import httpx

from tide_vllm.application.application import Application
from tide_vllm.application.chat_handler import ChatHandler
from tide_vllm.application.engines import DrainStore, Engines, RoutingObserver, Upstream
from tide_vllm.application.relay_handler import RelayHandler
from tide_vllm.domain.chat.factory import ChatDefaults, ChatFactory
from tide_vllm.domain.chat.repository import EngineMonitor
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


@dataclass(frozen=True)
class ProviderSettings:
    """`base_url` and `api_key` are the engine of a fleet of one, used when `engines` is
    empty; `defaults.model` is the model of requests that name none."""

    base_url: str
    timeout: float
    defaults: ChatDefaults
    api_key: str | None = None
    pool_size: int = 1024
    engines: tuple[EngineSettings, ...] = ()
    policy: str = "prefix"

    def fleet(self) -> tuple[EngineSettings, ...]:
        if self.engines:
            return self.engines
        return (EngineSettings(DEFAULT_ENGINE, self.defaults.model, self.base_url, self.api_key),)


@dataclass(frozen=True)
class Provider:
    """Typed, frozen container read by the wiring code and the web layer's dependencies."""

    settings: ProviderSettings
    clients: dict[str, VLLMClient] = field(default_factory=dict)
    application: Application = field(default=None)  # type: ignore[assignment]


@asynccontextmanager
async def open_provider(
    settings: ProviderSettings,
    monitor: EngineMonitor | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    *,
    monitors: Mapping[str, EngineMonitor] | None = None,
    observer: RoutingObserver | None = None,
    drains: DrainStore | None = None,
) -> AsyncIterator[Provider]:
    """Build the graph; each engine's HTTP client is closed on exit.

    Each engine's monitor is the supervisor's (auto-start) or an external engine's probe from
    `monitors` (by name; `monitor` for a fleet of one); an engine without one is probed here
    (`probe`: the watcher asks it every health interval)."""
    given = dict(monitors or {})
    fleet = settings.fleet()
    if monitor is not None:
        given.setdefault(fleet[0].name, monitor)
    clients: dict[str, VLLMClient] = {}
    async with AsyncExitStack() as stack:
        upstreams = []
        for engine in fleet:
            client = VLLMClient(
                engine.base_url,
                settings.timeout,
                api_key=engine.api_key,
                pool_size=settings.pool_size,
                transport=transport,
            )
            stack.push_async_callback(client.aclose)
            clients[engine.name] = client
            own = given.get(engine.name)
            upstreams.append(
                Upstream(
                    name=engine.name,
                    model=engine.model,
                    chat=VLLMChatRepository(client),
                    relay=VLLMRelayRepository(client),
                    monitor=own or VLLMEngineProbe(client, engine.model),
                    base_url=engine.base_url,
                    auto_start=engine.auto_start,
                    probe=own is None and len(fleet) > 1,
                    health_interval=engine.health_interval,
                )
            )
        factory = ChatFactory(settings.defaults)
        engines = Engines(
            upstreams,
            default_model=settings.defaults.model,
            policy=settings.policy,
            observer=observer,
            drains=drains,
        )
        application = Application(
            ChatHandler(engines, factory), factory, engines, RelayHandler(engines)
        )
        yield Provider(settings, clients, application)
