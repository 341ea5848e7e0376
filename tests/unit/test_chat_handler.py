from collections.abc import AsyncIterator

import pytest

from tide_vllm.application.chat_handler import ChatHandler as Handler
from tide_vllm.application.engines import Engines, Upstream
from tide_vllm.domain.chat.entity import (
    ChatDelta,
    ChatEntity,
    ChatResult,
    EngineState,
    EngineStatus,
    EngineUnavailable,
    OpenAIChat,
    Usage,
)
from tide_vllm.domain.chat.factory import ChatDefaults, ChatFactory
from tide_vllm.domain.chat.repository import ChatRepository

DEFAULTS = ChatDefaults("m", "sys", 16, 0.7, 0.9)


class FakeRepository(ChatRepository):
    """In memory: answers every chat by echoing the user's words."""

    def __init__(self) -> None:
        self.seen: list[ChatEntity] = []

    async def stream(self, chat: ChatEntity) -> AsyncIterator[ChatDelta]:
        self.seen.append(chat)
        for word in chat.messages[-1].content.split():
            yield ChatDelta(content=word)
        yield ChatDelta(finish_reason="stop", usage=Usage(3, 2, 5))

    async def relay(self, chat: OpenAIChat) -> bytes:
        raise NotImplementedError

    def relay_stream(self, chat: OpenAIChat) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def models(self) -> bytes:
        return b'{"data": []}'

    async def engine_metrics(self) -> bytes:
        return b""

    async def complete(self, chat: ChatEntity) -> ChatResult:
        self.seen.append(chat)
        return ChatResult(
            chat.request_id, f"echo {chat.messages[-1].content}", chat.model, Usage(3, 2, 5), "stop"
        )


class FixedMonitor:
    def __init__(self, status: EngineStatus) -> None:
        self.status = status

    def current(self) -> EngineStatus:
        return self.status

    async def check(self) -> EngineStatus:
        return self.status


READY = EngineStatus(EngineState.READY, True, "healthy")


def ChatHandler(repo: FakeRepository, factory: ChatFactory, monitor: FixedMonitor) -> Handler:  # noqa: N802
    """The handler over a fleet of one engine."""
    upstream = Upstream("default", DEFAULTS.model, repo, None, monitor)  # type: ignore[arg-type]
    return Handler(Engines([upstream], default_model=DEFAULTS.model), factory)


async def test_a_chat_is_answered_by_the_repository_with_its_request_id():
    repo = FakeRepository()
    factory = ChatFactory(DEFAULTS)
    handler = ChatHandler(repo, factory, FixedMonitor(READY))
    result = await handler.handle(factory.from_prompt("hello", request_id="r1"))
    assert result.content == "echo hello"
    assert result.request_id == "r1"
    assert result.usage.total_tokens == 5
    assert len(repo.seen) == 1


async def test_while_vllm_is_starting_the_chat_fails_at_once_saying_why():
    repo = FakeRepository()
    factory = ChatFactory(DEFAULTS)
    starting = EngineStatus(EngineState.STARTING, False, "vLLM is starting (12s)")
    handler = ChatHandler(repo, factory, FixedMonitor(starting))
    with pytest.raises(EngineUnavailable, match="starting"):
        await handler.handle(factory.from_prompt("hello"))
    assert repo.seen == []


async def test_a_stream_yields_the_text_then_the_finish_reason_and_usage():
    factory = ChatFactory(DEFAULTS)
    handler = ChatHandler(FakeRepository(), factory, FixedMonitor(READY))
    deltas = [d async for d in handler.stream(factory.from_prompt("one two"))]
    assert [d.content for d in deltas] == ["one", "two", ""]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].usage == Usage(3, 2, 5)


async def test_a_stream_is_refused_before_it_starts_while_vllm_is_down():
    factory = ChatFactory(DEFAULTS)
    down = EngineStatus(EngineState.FAILED, False, "vLLM exited unexpectedly with code 9")
    repo = FakeRepository()
    stream = ChatHandler(repo, factory, FixedMonitor(down)).stream(factory.from_prompt("hi"))
    with pytest.raises(EngineUnavailable, match="code 9"):
        await anext(stream)
    assert repo.seen == []
