"""The chat use cases: route the request to an engine of its model, then run it there."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tide_vllm.domain.chat.entity import ChatDelta, ChatEntity, ChatResult, OpenAIChat
from tide_vllm.domain.chat.factory import ChatFactory
from tide_vllm.domain.fleet import RequestFeatures

from .engines import Engines


class ChatHandler:
    def __init__(self, engines: Engines, factory: ChatFactory) -> None:
        self.engines = engines
        self.factory = factory

    def _tide_features(self, chat: ChatEntity, model: str) -> RequestFeatures:
        def build() -> RequestFeatures:
            messages = [{"role": m.role, "content": m.content} for m in chat.messages]
            return RequestFeatures.of_chat(messages, session_id=chat.session_id)

        return self.engines.features(model, build, chat.session_id)

    def _openai_features(self, chat: OpenAIChat, model: str) -> RequestFeatures:
        payload = chat.payload

        def build() -> RequestFeatures:
            return RequestFeatures.of_chat(
                payload.get("messages"), tools=payload.get("tools"), session_id=chat.session_id
            )

        return self.engines.features(model, build, chat.session_id)

    async def handle(self, chat: ChatEntity) -> ChatResult:
        model = self.engines.model_of(chat.model)
        features = self._tide_features(chat, model)
        return await self.engines.call(model, features, lambda u: u.chat.complete(chat))

    def stream(self, chat: ChatEntity) -> AsyncIterator[list[ChatDelta]]:
        model = self.engines.model_of(chat.model)
        features = self._tide_features(chat, model)
        return self.engines.stream(model, features, lambda u: u.chat.stream(chat))

    async def relay(self, chat: OpenAIChat) -> bytes:
        model = self.engines.model_of(chat.model)
        features = self._openai_features(chat, model)
        return await self.engines.call(model, features, lambda u: u.chat.relay(chat))

    def relay_stream(self, chat: OpenAIChat) -> AsyncIterator[bytes]:
        model = self.engines.model_of(chat.model)
        features = self._openai_features(chat, model)
        return self.engines.stream(model, features, lambda u: u.chat.relay_stream(chat))

    async def models(self) -> bytes:
        return await self.engines.models()

    async def engine_metrics(self, engine: str | None = None) -> bytes:
        """vLLM's own metrics, of the named engine (the first one by default)."""
        return await self.engines.upstream(engine).chat.engine_metrics()
