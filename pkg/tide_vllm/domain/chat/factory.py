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

    def from_openai(self, body: Mapping[str, Any], request_id: str | None = None) -> OpenAIChat:
        """An OpenAI chat request, checked only for what the service itself relies on; vLLM
        validates the rest and its refusals are relayed, so errors match vLLM's own."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidChatRequest("messages", "must be a non-empty array of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidChatRequest(f"messages[{i}]", "must be an object with a role")
        model = body.get("model")
        if model is None:
            model = self.defaults.model
        elif not isinstance(model, str) or not model:
            raise InvalidChatRequest("model", "must be a non-empty string")
        stream = body.get("stream")
        if stream is None:
            stream = False
        elif not isinstance(stream, bool):
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
        )
