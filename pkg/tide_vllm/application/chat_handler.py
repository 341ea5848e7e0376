"""The chat use case: check the engine can serve, build the request, run it."""

from __future__ import annotations

from tide_vllm.domain.chat.entity import ChatEntity, ChatResult, EngineUnavailable
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
