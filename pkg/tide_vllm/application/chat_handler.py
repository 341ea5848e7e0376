"""The chat use cases: check the engine can serve, then run the request."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tide_vllm.domain.chat.entity import (
    ChatDelta,
    ChatEntity,
    ChatResult,
    EngineUnavailable,
    OpenAIChat,
)
from tide_vllm.domain.chat.factory import ChatFactory
from tide_vllm.domain.chat.repository import ChatRepository, EngineMonitor


class ChatHandler:
    def __init__(
        self, repository: ChatRepository, factory: ChatFactory, monitor: EngineMonitor
    ) -> None:
        self.repository = repository
        self.factory = factory
        self.monitor = monitor

    def ensure_engine(self) -> None:
        """Fail at once with 503 semantics when vLLM certainly cannot answer."""
        status = self.monitor.current()
        if not status.accepts_requests:
            raise EngineUnavailable(status.detail or f"vLLM is {status.state.value}")

    async def handle(self, chat: ChatEntity) -> ChatResult:
        self.ensure_engine()
        return await self.repository.complete(chat)

    def stream(self, chat: ChatEntity) -> AsyncIterator[list[ChatDelta]]:
        self.ensure_engine()
        return self.repository.stream(chat)

    async def relay(self, chat: OpenAIChat) -> bytes:
        self.ensure_engine()
        return await self.repository.relay(chat)

    def relay_stream(self, chat: OpenAIChat) -> AsyncIterator[bytes]:
        self.ensure_engine()
        return self.repository.relay_stream(chat)

    async def models(self) -> bytes:
        self.ensure_engine()
        return await self.repository.models()

    async def engine_metrics(self) -> bytes:
        return await self.repository.engine_metrics()
