"""The chat use cases: route the request to an engine of its model, then run it there."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tide_vllm.domain.chat.entity import ChatDelta, ChatEntity, ChatResult, OpenAIChat
from tide_vllm.domain.chat.factory import ChatFactory
from tide_vllm.domain.fleet import RequestFeatures

from .engines import NO_FEATURES, Engines, Features, chat_tokens_query


class ChatHandler:
    def __init__(self, engines: Engines, factory: ChatFactory) -> None:
        self.engines = engines
        self.factory = factory

    def _tide_features(self, chat: ChatEntity, model: str) -> Features:
        if not self.engines.choosing(model):
            return NO_FEATURES
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]

        def build() -> RequestFeatures:
            return RequestFeatures.of_chat(messages, session_id=chat.session_id)

        return self.engines.features(
            model, build, chat.session_id, {"messages": messages}, chat.model
        )

    def _openai_features(self, chat: OpenAIChat, model: str) -> Features:
        if not self.engines.choosing(model):
            return NO_FEATURES
        payload = chat.payload

        def build() -> RequestFeatures:
            return RequestFeatures.of_chat(
                payload.get("messages"), tools=payload.get("tools"), session_id=chat.session_id
            )

        return self.engines.features(
            model, build, chat.session_id, chat_tokens_query(payload), chat.model
        )

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
