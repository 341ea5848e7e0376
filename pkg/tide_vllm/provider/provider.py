"""The composition root: builds the object graph once and owns its resources."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from tide_vllm.application.application import Application
from tide_vllm.application.chat_handler import ChatHandler
from tide_vllm.application.relay_handler import RelayHandler
from tide_vllm.domain.chat.factory import ChatDefaults, ChatFactory
from tide_vllm.domain.chat.repository import EngineMonitor
from tide_vllm.infrastructure.vllm.relay_repository import VLLMRelayRepository
from tide_vllm.infrastructure.vllm.vllm_client import VLLMClient
from tide_vllm.infrastructure.vllm.vllm_repository import VLLMChatRepository, VLLMEngineProbe


@dataclass(frozen=True)
class ProviderSettings:
    base_url: str
    timeout: float
    defaults: ChatDefaults
    api_key: str | None = None
    pool_size: int = 1024


@dataclass(frozen=True)
class Provider:
    """Typed, frozen container read by the wiring code and the web layer's dependencies."""

    settings: ProviderSettings
    client: VLLMClient
    application: Application


@asynccontextmanager
async def open_provider(
    settings: ProviderSettings,
    monitor: EngineMonitor | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Provider]:
    """Build the graph; the shared HTTP client is closed on exit.

    `monitor` is the supervisor in auto-start mode; without one (manual mode) vLLM is probed.
    """
    client = VLLMClient(
        settings.base_url,
        settings.timeout,
        api_key=settings.api_key,
        pool_size=settings.pool_size,
        transport=transport,
    )
    try:
        factory = ChatFactory(settings.defaults)
        engine = monitor or VLLMEngineProbe(client, settings.defaults.model)
        handler = ChatHandler(VLLMChatRepository(client), factory, engine)
        relay = RelayHandler(VLLMRelayRepository(client), engine)
        yield Provider(settings, client, Application(handler, factory, engine, relay))
    finally:
        await client.aclose()
