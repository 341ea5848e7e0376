"""Every other route of vLLM's API, relayed: `/v1/completions`, `/v1/responses`,
`/v1/messages`, `/v1/embeddings`, `/tokenize`, `/rerank`, `/v1/audio/transcriptions` and
the rest, as one plain ASGI endpoint for any path the service does not serve itself.

A relayed request gets what a chat gets: the gateway's API keys, request id, access log and
metrics (labelled by route), the body-size limit and `web.body_timeout`, a concurrency slot
once its body is in, 503 at once while vLLM cannot serve, 504 when it does not answer within
`vllm.timeout`, and cancellation upstream when the client leaves. vLLM's answer, its errors
and its 404 for a route it does not serve included, is relayed as it comes: an event stream
event by event, anything else whole.
"""

from __future__ import annotations

import orjson

from tide_vllm.application.application import Application
from tide_vllm.domain.chat.entity import RelayRequest
from tide_vllm.domain.chat.repository import RelayAnswer

from .chat import Endpoint, _Exchange
from .errors import OPENAI_SHAPE

# Headers of the caller's that do not go on to vLLM: hop-by-hop ones, the client's own
# (the relay sets Host, Content-Length, Authorization and X-Request-Id), and Accept-Encoding
# (vLLM's answers come uncompressed; the client decodes any that are not).
_NOT_FORWARDED = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length",
        b"authorization", b"x-request-id", b"accept-encoding", b"expect",
    }
)  # fmt: skip
# Headers of vLLM's answer that the server in front sets itself.
_NOT_RELAYED = frozenset({b"server", b"date", b"content-length", b"x-request-id"})


class RelayEndpoint(Endpoint):
    """ASGI app for every path that is neither a chat path nor one of the service's own."""

    async def handle(self, exchange: _Exchange, app: Application) -> None:
        exchange.state["shape"] = OPENAI_SHAPE
        body = await self.read_body(exchange.read_body(self.max_body_bytes))
        with self.slot():
            await exchange.until_disconnect(self._relay(exchange, app, body))

    async def _relay(self, exchange: _Exchange, app: Application, body: bytes) -> None:
        scope = exchange.scope
        target = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        request = RelayRequest(
            method=scope["method"],
            target=target,
            headers=tuple((k, v) for k, v in scope["headers"] if k.lower() not in _NOT_FORWARDED),
            body=body,
            request_id=exchange.state["request_id"],
        )
        answer = await app.relay.open(request)
        try:
            await self._answer(exchange, answer)
        finally:
            await answer.aclose()

    async def _answer(self, exchange: _Exchange, answer: RelayAnswer) -> None:
        headers = [(k, v) for k, v in answer.headers if k not in _NOT_RELAYED]
        content_type = next((v for k, v in headers if k == b"content-type"), b"")
        if not content_type.startswith(b"text/event-stream"):
            content = await answer.read()
            exchange.state["usage"] = _usage_of(content)
            await exchange.respond(answer.status, content, None, headers)
            return
        # An event stream: each piece as it comes, never held.
        started = False
        async for chunk in answer:
            if not started:
                await exchange.start(answer.status, headers)
                started = True
            await exchange.send({"type": "http.response.body", "body": chunk, "more_body": True})
        if not started:
            await exchange.start(answer.status, headers)
        exchange.completed = True
        await exchange.send({"type": "http.response.body", "body": b""})


def _usage_of(content: bytes) -> tuple[int, int] | None:
    """Token counts of a JSON answer that has OpenAI's usage, for the metrics."""
    if b'"usage"' not in content:
        return None
    try:
        usage = orjson.loads(content).get("usage")
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None
