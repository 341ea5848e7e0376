"""ChatRepository and EngineMonitor on top of vLLM; reads vLLM's answers and turns its error
bodies into the domain's errors (the client, vllm_client.py, translates the HTTP libraries')."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from tide_vllm.domain.chat.entity import (
    ChatDelta,
    ChatEntity,
    ChatError,
    ChatResult,
    EngineFailed,
    EngineRejected,
    EngineState,
    EngineStatus,
    OpenAIChat,
    Usage,
)
from tide_vllm.domain.chat.repository import ChatRepository
from tide_vllm.domain.fleet.engine import EngineMetrics

from .vllm_client import Answer, VLLMClient
from .vllm_metrics import parse_engine_metrics

EVENT_END = b"\n\n"


class VLLMChatRepository(ChatRepository):
    def __init__(self, client: VLLMClient) -> None:
        self.client = client

    # -- the spec's (Tide) requests -------------------------------------------------------
    async def complete(self, chat: ChatEntity) -> ChatResult:
        _, content = await self._post(_payload(chat), chat.request_id)
        body = _json_object(content)
        try:
            choice = body["choices"][0]
            return ChatResult(
                request_id=chat.request_id,
                content=choice["message"].get("content") or "",
                model=str(body.get("model", chat.model)),
                usage=_usage(body.get("usage")) or Usage(),
                finish_reason=choice.get("finish_reason"),
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise EngineFailed("vLLM returned a body that is not a chat completion") from None

    async def stream(self, chat: ChatEntity) -> AsyncIterator[list[ChatDelta]]:
        """The answer's text deltas, those that arrived together in one list; the first list
        is empty (vLLM accepted the request), the last delta has the finish reason and the
        usage. Parsed as the response's bytes come (no layer of event blocks in between)."""
        payload = {**_payload(chat), "stream": True, "stream_options": {"include_usage": True}}
        reader = _DeltaReader()
        response = await self._open_stream(payload, chat.request_id)
        try:
            yield []  # vLLM accepted the request; its events follow
            buffer = b""
            async for chunk in response:
                if reader.done:
                    continue  # read to the end only so the connection can be reused
                buffer += chunk
                end = buffer.rfind(EVENT_END)
                if end >= 0:
                    deltas = reader.read(buffer[: end + 2])
                    buffer = buffer[end + 2 :]
                    if deltas:
                        yield deltas
            if buffer.strip() and not reader.done:  # a last event without its blank line
                deltas = reader.read(buffer)
                if deltas:
                    yield deltas
        finally:
            await response.aclose()
        if not reader.done:
            yield [ChatDelta(finish_reason=reader.finish_reason, usage=reader.usage)]

    # -- OpenAI requests, carried opaquely ------------------------------------------------
    async def relay(self, chat: OpenAIChat) -> bytes:
        content_type, content = await self._post(chat.payload, chat.request_id)
        if "json" not in content_type:
            raise EngineFailed("vLLM returned a body that is not JSON")
        try:
            if not isinstance(orjson.loads(content), dict):
                raise ValueError
        except ValueError:  # orjson.JSONDecodeError is one
            raise EngineFailed("vLLM returned a body that is not a JSON object") from None
        return content

    def relay_stream(self, chat: OpenAIChat) -> AsyncIterator[bytes]:
        return self._event_blocks(chat.payload, chat.request_id)

    async def models(self) -> bytes:
        return await self._get("/v1/models")

    async def engine_metrics(self) -> bytes:
        return await self._get("/metrics")

    async def engine_gauges(self) -> EngineMetrics:
        text = (await self._get("/metrics")).decode("utf-8", errors="replace")
        try:
            return parse_engine_metrics(text)
        except ValueError as exc:
            raise EngineFailed(f"vLLM's metrics cannot be read: {exc}") from None

    async def tokenize(self, body: Mapping[str, Any]) -> list[int]:
        answer = await self.client.open(
            "POST", "/tokenize", [(b"content-type", b"application/json")], orjson.dumps(body)
        )
        content = await answer.read()
        if answer.status >= 400:
            raise _upstream_error(answer.status, content)
        tokens = _json_object(content).get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise EngineFailed("vLLM's /tokenize did not answer token ids")
        return tokens

    async def _get(self, path: str) -> bytes:
        answer = await self.client.open("GET", path)
        content = await answer.read()
        if answer.status >= 400:
            raise _upstream_error(answer.status, content)
        return content

    # -- transport ------------------------------------------------------------------------
    async def _post(self, payload: Mapping[str, Any], request_id: str) -> tuple[str, bytes]:
        """vLLM's whole answer: its content type and body (the error it stands for if any)."""
        answer = await self.client.open_chat(payload, request_id)
        content = await answer.read()
        if answer.status >= 400:
            raise _upstream_error(answer.status, content)
        return answer.header(b"content-type"), content

    async def _open_stream(self, payload: Mapping[str, Any], request_id: str) -> Answer:
        """vLLM's answer to a streamed request, once its head is in and it is an event stream
        (else the error it stands for, its body read and the connection closed)."""
        answer = await self.client.open_chat(payload, request_id)
        try:
            if answer.status >= 400:
                raise _upstream_error(answer.status, await answer.read())
            if "text/event-stream" not in answer.header(b"content-type"):
                raise EngineFailed("vLLM did not answer with an event stream")
        except BaseException:
            await answer.aclose()
            raise
        return answer

    async def _event_blocks(
        self, payload: Mapping[str, Any], request_id: str
    ) -> AsyncIterator[bytes]:
        """The answer's blocks of whole server-sent events (each ending in a blank line), passed
        on as soon as they are complete: a chunk that holds several events is one block, never
        split or held. The first block is empty: vLLM accepted the request (its answer's head
        is in), so the caller can start its own answer before the first token. Read as the
        bytes come; leaving early closes the connection, which makes vLLM abort the
        generation."""
        response = await self._open_stream(payload, request_id)
        try:
            yield b""  # vLLM accepted the request; its events follow
            buffer = b""
            async for chunk in response:
                buffer += chunk
                end = buffer.rfind(EVENT_END)
                if end >= 0:
                    yield buffer[: end + 2]
                    buffer = buffer[end + 2 :]
            if buffer.strip():
                yield buffer + EVENT_END
        finally:
            await response.aclose()


class _DeltaReader:
    """Reads vLLM's chat.completion.chunk events into deltas; remembers the finish reason and
    the usage for the last delta, which goes with `data: [DONE]`."""

    __slots__ = ("finish_reason", "usage", "done")

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.done = False  # `data: [DONE]` came

    def read(self, block: bytes) -> list[ChatDelta]:
        deltas = []
        for line in block.split(b"\n"):  # vLLM sends one `data:` line per event
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                deltas.append(ChatDelta(finish_reason=self.finish_reason, usage=self.usage))
                break
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise EngineFailed("vLLM returned an event that is not JSON") from None
            if type(chunk) is not dict:
                raise EngineFailed("vLLM returned an event that is not a JSON object")
            if "error" in chunk:
                raise _error_from_body(chunk, 502)
            usage = chunk.get("usage")
            if usage is not None:
                self.usage = _usage(usage) or self.usage
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta")
                text = delta.get("content") if delta else None
                finish = choice.get("finish_reason")
                if finish:
                    self.finish_reason = finish
                if text:
                    deltas.append(ChatDelta(content=text))
        return deltas


def _payload(chat: ChatEntity) -> dict[str, Any]:
    return {
        "model": chat.model,
        "messages": [{"role": m.role, "content": m.content} for m in chat.messages],
        "max_tokens": chat.params.max_tokens,
        "temperature": chat.params.temperature,
        "top_p": chat.params.top_p,
    }


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        total_tokens=int(raw.get("total_tokens") or 0),
    )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise EngineFailed("vLLM returned a body that is not JSON") from None
    if not isinstance(body, dict):
        raise EngineFailed("vLLM returned a body that is not a JSON object")
    return body


def _upstream_error(status: int, raw: bytes) -> Exception:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        text = raw[:200].decode(errors="replace").strip()
        body = {
            "error": {"message": f"vLLM answered HTTP {status}" + (f": {text}" if text else "")}
        }
    return _error_from_body(body, status)


def _error_from_body(body: dict[str, Any], status: int) -> Exception:
    """vLLM's error body: {"error": {"message", "type", "param", "code"}} (older: flat)."""
    err = body.get("error", body)
    message, param, kind = f"vLLM answered HTTP {status}", None, None
    if isinstance(err, dict):
        message = str(err.get("message") or message)
        param = err.get("param")
        kind = err.get("type")
    elif isinstance(err, str):
        message = err
    if 400 <= status < 500:
        return EngineRejected(status, message, param=param, kind=kind)
    return EngineFailed(f"vLLM error: {message}", status=status)


class VLLMEngineProbe:
    """EngineMonitor for manual mode: asks vLLM whether it serves the model."""

    def __init__(self, client: VLLMClient, model_name: str, probe_timeout: float = 2.0) -> None:
        self.client = client
        self.model_name = model_name
        self.probe_timeout = probe_timeout
        self._last = EngineStatus(EngineState.EXTERNAL, False, "vLLM not checked yet")

    def current(self) -> EngineStatus:
        return self._last

    async def check(self) -> EngineStatus:
        self._last = await probe_models(self.client, self.model_name, self.probe_timeout)
        return self._last


async def probe_models(
    client: VLLMClient, model_name: str, timeout: float, state: EngineState = EngineState.EXTERNAL
) -> EngineStatus:
    """Healthy when GET /v1/models lists the served model; otherwise say why not."""
    try:
        answer = await client.open("GET", "/v1/models", timeout=timeout)
        body = await answer.read()
    except ChatError as exc:
        return EngineStatus(state, False, f"vLLM unreachable ({exc.message})")
    if answer.status >= 400:
        return EngineStatus(state, False, f"vLLM answered HTTP {answer.status}")
    try:
        data = orjson.loads(body).get("data")
    except (orjson.JSONDecodeError, AttributeError):
        data = None
    if not isinstance(data, list):
        return EngineStatus(state, False, f"vLLM at {client.base_url} did not return a model list")
    models = [str(item.get("id")) for item in data if isinstance(item, dict)]
    if model_name not in models:
        return EngineStatus(
            state, False, f"vLLM does not serve {model_name!r} (it serves {', '.join(models)})"
        )
    return EngineStatus(state, True, "healthy")
