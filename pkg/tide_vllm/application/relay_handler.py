"""The relay use case: every route of vLLM's API that the service does not serve itself goes,
as it came, to an engine of the model its body names (the default model when it names none)."""

from __future__ import annotations

from typing import Any

import orjson

from tide_vllm.domain.chat.entity import RelayRequest
from tide_vllm.domain.chat.repository import RelayAnswer
from tide_vllm.domain.fleet import RequestFeatures

from .engines import (
    NO_FEATURES,
    Engines,
    TokensQuery,
    chat_tokens_query,
    prompt_tokens_query,
)

SESSION_HEADER = b"x-session-id"


class RelayHandler:
    def __init__(self, engines: Engines) -> None:
        self.engines = engines

    async def open(self, request: RelayRequest) -> RelayAnswer:
        engines = self.engines
        if engines.single is not None:  # nothing to choose: the body is not read
            return await engines.relay(engines.single.model, NO_FEATURES, request)
        body = _json_body(request)
        model = engines.model_of(body.get("model"))
        session = request.header(SESSION_HEADER)
        session_id = session.decode("latin-1") if session else None

        def build() -> RequestFeatures:
            if "messages" in body:
                return RequestFeatures.of_chat(
                    body["messages"], tools=body.get("tools"), session_id=session_id
                )
            for key in ("prompt", "input", "text", "text_1", "query"):
                if key in body:
                    return RequestFeatures.of_prompt(body[key], session_id=session_id)
            return RequestFeatures(session_id=session_id)

        # Precise mode asks an engine for the prompt's token ids of the routes that generate
        # from one; the others (embeddings, scores, /tokenize itself …) route on their text.
        path = request.target.partition("?")[0]
        tokens: TokensQuery | None = None
        if path == "/v1/chat/completions":
            tokens = chat_tokens_query(body)
        elif path == "/v1/completions":
            tokens = prompt_tokens_query(body.get("prompt"))
        features = engines.features(model, build, session_id, tokens, body.get("model"))
        return await engines.relay(model, features, request)


def _json_body(request: RelayRequest) -> dict[str, Any]:
    """The body, when it is a JSON object (what routing reads of it: `model`, the prompt);
    anything else (a form with audio, no body) routes as the default model's."""
    if not request.body:
        return {}
    content_type = request.header(b"content-type") or b""
    if b"json" not in content_type.lower() and not request.body.lstrip().startswith(b"{"):
        return {}
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}
