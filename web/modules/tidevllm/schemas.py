"""Request and response schemas of the HTTP API (the spec's section 6)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tide_vllm.domain.chat.entity import ChatResult, Usage
from web.gateway import REQUEST_ID_PATTERN


class TideChatRequest(BaseModel):
    """The spec's request table. Strict: "5" is not a number and 5 is not a prompt."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="The user's prompt.")
    system_prompt: str | None = Field(None, description='Default "你是一个有用的AI助手。".')
    request_id: str | None = Field(
        None,
        max_length=256,
        pattern=REQUEST_ID_PATTERN,
        description="Echoed back (and sent as X-Request-Id); a UUID4 when omitted. Printable "
        "ASCII, no leading or trailing space.",
    )
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="Default vllm.max_tokens.")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, allow_inf_nan=False, description="Default vllm.temperature."
    )
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, allow_inf_nan=False, description="Default vllm.top_p."
    )
    stream: bool = Field(False, description="Server-sent events in the Tide shape.")


class UsageBody(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TideChatResponse(BaseModel):
    """The spec's response: on failure `content` is empty and `error` says why."""

    request_id: str
    content: str
    model: str
    usage: UsageBody
    finish_reason: str | None
    error: str | None = None

    @staticmethod
    def body_of(result: ChatResult) -> dict[str, Any]:
        """The answer to `result` as the JSON object this model describes, built directly:
        building the model and dumping it took ~5 µs a request (a unit test checks the two
        agree)."""
        return {
            "request_id": result.request_id,
            "content": result.content,
            "model": result.model,
            "usage": usage_body(result.usage),
            "finish_reason": result.finish_reason,
            "error": None,
        }

    @classmethod
    def failure(cls, request_id: str, model: str, error: str) -> TideChatResponse:
        return cls(
            request_id=request_id,
            content="",
            model=model,
            usage=UsageBody(),
            finish_reason=None,
            error=error,
        )


class EngineHealth(BaseModel):
    name: str
    model: str
    state: str = Field(description="starting, ready, restarting, failed, draining, …")
    healthy: bool
    detail: str


class HealthResponse(BaseModel):
    status: str = Field(description='"healthy", or why vLLM is not ready.')
    vllm_healthy: bool = Field(description="Every model has a ready engine.")
    vllm_state: str = Field(
        description="starting, ready, unhealthy, failed, external, … (the engine's, for one "
        "engine; ready or degraded for several)"
    )
    engines: list[EngineHealth] = Field(default_factory=list)


def usage_body(u: Usage) -> dict[str, int]:
    """`usage` as a Tide answer and a stream's last event carry it (UsageBody's fields)."""
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }
