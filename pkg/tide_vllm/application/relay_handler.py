"""The relay use case: every route of vLLM's API that the service does not serve itself goes,
as it came, to an engine of the model its body names (the default model when it names none);
a request about a stored response of the Responses API, to the engine that stored it; a LoRA
adapter loaded or unloaded at run time, to every engine of the model."""

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
RESPONSES = "/v1/responses"
# The routes that change an engine's state, sent to every engine of the model.
LOAD_ADAPTER = "/v1/load_lora_adapter"
EVERY_ENGINE = frozenset({LOAD_ADAPTER, "/v1/unload_lora_adapter"})


class RelayHandler:
    def __init__(self, engines: Engines) -> None:
        self.engines = engines

    async def open(self, request: RelayRequest) -> RelayAnswer:
        engines = self.engines
        if engines.single is not None:  # nothing to choose: the body is not read
            return await engines.relay(engines.single.model, NO_FEATURES, request)
        body = _json_body(request)
        path = request.target.partition("?")[0]
        creates = request.method == "POST" and path == RESPONSES
        if request.method == "POST" and path in EVERY_ENGINE:
            # A change of every engine's state: `model` (which vLLM ignores here) says
            # which model's engines, the default model's when absent.
            name = body.get("lora_name")
            adapter = (name, path == LOAD_ADAPTER) if isinstance(name, str) and name else None
            model = engines.model_of(body.get("model"))
            return await engines.relay_every(model, request, adapter)
        stored = _stored_response(request.method, path, body)
        if stored is not None:
            model = engines.model_of(body["model"]) if body.get("model") else None
            return await engines.relay_stored(model, stored, request, creates_response=creates)
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
        tokens: TokensQuery | None = None
        if path == "/v1/chat/completions":
            tokens = chat_tokens_query(body)
        elif path == "/v1/completions":
            tokens = prompt_tokens_query(body.get("prompt"))
        features = engines.features(model, build, session_id, tokens, body.get("model"))
        return await engines.relay(model, features, request, creates_response=creates)


def _stored_response(method: str, path: str, body: dict[str, Any]) -> str | None:
    """The id of the stored response (vLLM's Responses API) a request is about: one to
    retrieve (GET /v1/responses/{id}), delete or cancel (POST /v1/responses/{id}/cancel),
    or to continue from (`previous_response_id` of POST /v1/responses); else None."""
    if path == RESPONSES:
        previous = body.get("previous_response_id") if method == "POST" else None
        return previous if isinstance(previous, str) and previous else None
    if not path.startswith(RESPONSES + "/"):
        return None
    rest = path[len(RESPONSES) + 1 :]
    if method == "POST" and rest.endswith("/cancel"):
        rest = rest.removesuffix("/cancel")
    elif method not in ("GET", "DELETE"):
        return None  # POST /v1/responses/render and the like
    return rest if rest and "/" not in rest else None


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
