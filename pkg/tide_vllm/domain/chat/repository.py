"""Ports the chat domain needs; infrastructure and the supervisor implement them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from .entity import ChatEntity, ChatResult, EngineStatus


class ChatRepository(ABC):
    """Where chat completions come from."""

    @abstractmethod
    async def complete(self, chat: ChatEntity) -> ChatResult:
        """Run one chat; raises the domain's Engine* errors."""


class EngineMonitor(Protocol):
    """Tells whether the engine behind the repository can serve."""

    def current(self) -> EngineStatus:
        """The latest known status; cheap, called on every request."""
        ...

    async def check(self) -> EngineStatus:
        """A fresh status; may ask vLLM, called by /health."""
        ...
