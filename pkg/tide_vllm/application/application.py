"""The application: the use cases the web layer may call, wired once by the provider."""

from __future__ import annotations

from dataclasses import dataclass

from tide_vllm.domain.chat.factory import ChatFactory

from .chat_handler import ChatHandler
from .engines import Engines, FleetHealth
from .relay_handler import RelayHandler


@dataclass(frozen=True)
class Application:
    chat: ChatHandler
    factory: ChatFactory
    engines: Engines
    relay: RelayHandler

    async def health(self) -> FleetHealth:
        """A fresh status of every engine: healthy while every model has a ready one."""
        return await self.engines.check()
