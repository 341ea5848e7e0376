"""Chat entities, value objects and the domain's errors. Plain Python: no framework here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class ChatError(Exception):
    """Base of every error the chat domain raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidChatRequest(ChatError):
    """The caller's request breaks an invariant; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class EngineUnavailable(ChatError):
    """vLLM is not ready (starting, down, stopped, disabled) or cannot be reached."""


class EngineUnreachable(EngineUnavailable):
    """No connection to vLLM could be made: nothing was sent, so the request may be tried on
    another engine."""


class ModelNotFound(ChatError):
    """No engine serves the requested model (vLLM's own 404 for it, in its words)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.")
        self.model = model


class EngineTimeout(ChatError):
    """vLLM did not answer within the configured timeout."""


class EngineRejected(ChatError):
    """vLLM refused the request (its own 4xx); carries vLLM's status and message."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.kind = kind


class EngineFailed(ChatError):
    """vLLM answered with a server error or with something that is not a chat completion."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidChatRequest("max_tokens", "must be at least 1")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            raise InvalidChatRequest("temperature", "must be between 0 and 2")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidChatRequest("top_p", "must be greater than 0 and at most 1")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ChatEntity:
    """One chat request as the service understands it: who asks, what, and how to sample."""

    request_id: str
    model: str
    messages: tuple[Message, ...]
    params: SamplingParams
    session_id: str | None = None  # X-Session-Id: a hint to keep a conversation on one engine

    def __post_init__(self) -> None:
        if not self.messages:
            raise InvalidChatRequest("messages", "at least one message is required")


@dataclass(frozen=True, slots=True)
class ChatResult:
    request_id: str
    content: str
    model: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ChatDelta:
    """One step of a streamed chat: new text, and at the end the finish reason and usage."""

    content: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class OpenAIChat:
    """An OpenAI chat request. The service reads what it must (model, stream, request id) and
    carries the caller's payload to vLLM unchanged, so every field — tools, response_format,
    logprobs, vLLM's extras — reaches vLLM, and vLLM's answer reaches the caller, as sent."""

    request_id: str
    model: str
    stream: bool
    payload: Mapping[str, Any]
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class RelayRequest:
    """Any other request of vLLM's API (completions, responses, embeddings, tokenize, audio …),
    carried to vLLM as it came: the service reads none of it. `target` is the path with its
    query; `headers` are the caller's end-to-end ones (names in lower case)."""

    method: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    request_id: str

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case), or None."""
        return next((value for key, value in self.headers if key == name), None)


class EngineState(str, Enum):
    """The supervisor's states (DESIGN.md section 3); `external` is manual mode."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    FAILED = "failed"
    DISABLED = "disabled"
    EXTERNAL = "external"


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """What /health reports: whether vLLM serves the model, and if not, why."""

    state: EngineState
    healthy: bool
    detail: str = ""

    @property
    def accepts_requests(self) -> bool:
        """False when a request is certain to fail, so it gets a 503 at once."""
        if self.state is EngineState.EXTERNAL:
            return True  # manual mode: vLLM may have come up since the last probe; try it.
        return self.healthy or self.state is EngineState.UNHEALTHY
