"""Ports the chat domain needs; infrastructure and the supervisor implement them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from tide_vllm.domain.fleet.engine import EngineMetrics

from .entity import ChatDelta, ChatEntity, ChatResult, EngineStatus, OpenAIChat, RelayRequest


class ChatRepository(ABC):
    """Where chat completions come from. Every method raises the domain's Engine* errors;
    a stream raises them before its first item when vLLM refuses the request at once."""

    @abstractmethod
    async def complete(self, chat: ChatEntity) -> ChatResult:
        """Run one chat."""

    @abstractmethod
    def stream(self, chat: ChatEntity) -> AsyncIterator[list[ChatDelta]]:
        """Run one chat, yielding the text as it is generated: first an empty list once the
        engine has accepted the request, then the deltas that arrived together, in one list.
        The last delta carries the finish reason and usage; the stream may go on after it,
        yielding nothing, while the answer's end is read."""

    @abstractmethod
    async def relay(self, chat: OpenAIChat) -> bytes:
        """vLLM's `chat.completion` JSON for an OpenAI request, unchanged."""

    @abstractmethod
    def relay_stream(self, chat: OpenAIChat) -> AsyncIterator[bytes]:
        """vLLM's server-sent events for an OpenAI request, whole events as they arrive,
        after an empty block once vLLM has accepted the request."""

    @abstractmethod
    async def models(self) -> bytes:
        """vLLM's `GET /v1/models` list, unchanged."""

    @abstractmethod
    async def engine_metrics(self) -> bytes:
        """vLLM's own Prometheus metrics, unchanged."""

    async def engine_gauges(self) -> EngineMetrics:
        """What routing reads of vLLM's own metrics (its queue, its KV cache)."""
        raise NotImplementedError

    async def tokenize(self, body: Mapping[str, Any]) -> list[int]:
        """The token ids of a prompt as the engine renders it (vLLM's `POST /tokenize`): `body`
        holds a chat's messages and template settings, or a completion's prompt."""
        raise NotImplementedError


class EngineMonitor(Protocol):
    """Tells whether the engine behind the repository can serve."""

    def current(self) -> EngineStatus:
        """The latest known status; cheap, called on every request."""
        ...

    async def check(self) -> EngineStatus:
        """A fresh status; may ask vLLM, called by /health."""
        ...


class RelayAnswer(Protocol):
    """vLLM's answer to a relayed request, once its head is in: status, end-to-end headers
    (lower-case names), and its body as it arrives. Closing it before the body's end makes
    vLLM abort the request."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes:
        """The rest of the body; then the answer is closed."""
        ...

    async def aclose(self) -> None: ...


class RelayRepository(Protocol):
    """Where relayed requests go. Raises the domain's Engine* errors when vLLM cannot be
    reached or does not answer in time; vLLM's own answers, errors included, are answers."""

    async def open(self, request: RelayRequest) -> RelayAnswer: ...
