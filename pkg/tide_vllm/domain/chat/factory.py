"""Builds ChatEntity from what a caller sent, filling the configured defaults."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from .entity import ChatEntity, InvalidChatRequest, Message, SamplingParams


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
        )
