"""The application: the use cases the web layer may call, wired once by the provider."""

from __future__ import annotations

from dataclasses import dataclass

from tide_vllm.domain.chat.entity import EngineStatus
from tide_vllm.domain.chat.factory import ChatFactory
from tide_vllm.domain.chat.repository import EngineMonitor

from .chat_handler import ChatHandler
from .relay_handler import RelayHandler


@dataclass(frozen=True)
class Application:
    chat: ChatHandler
    factory: ChatFactory
    monitor: EngineMonitor
    relay: RelayHandler

    async def health(self) -> EngineStatus:
        return await self.monitor.check()
