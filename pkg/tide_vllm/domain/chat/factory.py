"""Builds ChatEntity from what a caller sent, filling the configured defaults."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .entity import ChatEntity, InvalidChatRequest, Message, OpenAIChat, SamplingParams


@dataclass(frozen=True)
class ChatDefaults:
    model: str
    system_prompt: str
    max_tokens: int
    temperature: float
    top_p: float


class ChatFactory:
    def __init__(self, defaults: ChatDefaults) -> None:
        self.defaults = defaults

    def new_request_id(self) -> str:
        return str(uuid.uuid4())

    def from_prompt(
        self,
        prompt: str,
        *,
        system_prompt: str | None = None,
        request_id: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        session_id: str | None = None,
    ) -> ChatEntity:
        """The spec's request: one user prompt under one system prompt."""
        if not prompt.strip():
            raise InvalidChatRequest("prompt", "must not be empty")
        d = self.defaults
        system = d.system_prompt if system_prompt is None else system_prompt
        messages = (Message("user", prompt),)
        if system:
            messages = (Message("system", system), *messages)
        return ChatEntity(
            request_id=request_id or self.new_request_id(),
            model=d.model,
            messages=messages,
            params=SamplingParams(
                max_tokens=d.max_tokens if max_tokens is None else max_tokens,
                temperature=d.temperature if temperature is None else temperature,
                top_p=d.top_p if top_p is None else top_p,
            ),
            session_id=session_id,
        )

    def from_openai(
        self,
        body: Mapping[str, Any],
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> OpenAIChat:
        """An OpenAI chat request. The service reads only what it relies on (the model, to
        route; whether it streams) and is never stricter than vLLM: what vLLM validates
        (messages, roles, value ranges) it lets vLLM validate, and relays vLLM's refusal."""
        model = body.get("model")
        if model is None or model == "":  # vLLM serves its model for either
            model = self.defaults.model
        elif not isinstance(model, str):
            raise InvalidChatRequest("model", "must be a string")
        stream = _lax_bool(body.get("stream"))
        if stream is None:
            raise InvalidChatRequest("stream", "must be a boolean")
        payload = body if body.get("model") == model else {**body, "model": model}
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            # Without a limit vLLM generates up to the context's end: the small demo model
            # then loops until the timeout. The configured vllm.max_tokens bounds it, as it
            # bounds the spec's requests.
            payload = {**payload, "max_tokens": self.defaults.max_tokens}
        return OpenAIChat(
            request_id=request_id or self.new_request_id(),
            model=model,
            stream=stream,
            payload=payload,
            session_id=session_id,
        )


# What pydantic's lax mode, and so vLLM, reads as a boolean.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _lax_bool(value: Any) -> bool | None:
    """`stream` as vLLM reads it (None when vLLM would refuse it too)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None
