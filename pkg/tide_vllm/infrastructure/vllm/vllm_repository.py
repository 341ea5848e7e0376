"""ChatRepository and EngineMonitor on top of vLLM; translates httpx and vLLM errors into
the domain's errors."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tide_vllm.domain.chat.entity import (
    ChatEntity,
    ChatResult,
    EngineFailed,
    EngineRejected,
    EngineState,
    EngineStatus,
    EngineTimeout,
    EngineUnavailable,
    Usage,
)
from tide_vllm.domain.chat.repository import ChatRepository

from .vllm_client import VLLMClient


class VLLMChatRepository(ChatRepository):
    def __init__(self, client: VLLMClient) -> None:
        self.client = client

    async def complete(self, chat: ChatEntity) -> ChatResult:
        payload = {
            "model": chat.model,
            "messages": [{"role": m.role, "content": m.content} for m in chat.messages],
            "max_tokens": chat.params.max_tokens,
            "temperature": chat.params.temperature,
            "top_p": chat.params.top_p,
        }
        response = await self._send(payload, chat.request_id)
        body = _json_body(response)
        try:
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            return ChatResult(
                request_id=chat.request_id,
                content=choice["message"].get("content") or "",
                model=str(body.get("model", chat.model)),
                usage=Usage(
                    prompt_tokens=int(usage.get("prompt_tokens", 0)),
                    completion_tokens=int(usage.get("completion_tokens", 0)),
                    total_tokens=int(usage.get("total_tokens", 0)),
                ),
                finish_reason=choice.get("finish_reason"),
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise EngineFailed("vLLM returned a body that is not a chat completion") from None

    async def _send(self, payload: dict[str, Any], request_id: str) -> httpx.Response:
        try:
            response = await self.client.chat_completions(payload, request_id)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise EngineUnavailable(f"cannot reach vLLM at {self.client.base_url}: {exc}") from None
        except httpx.TimeoutException:
            raise EngineTimeout(f"vLLM did not answer within {self.client.timeout:g}s") from None
        except httpx.TransportError as exc:
            # The connection broke mid-request: vLLM went away.
            raise EngineUnavailable(f"lost the connection to vLLM: {exc!r}") from None
        if response.status_code >= 400:
            raise _upstream_error(response)
        return response


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EngineFailed("vLLM returned a body that is not JSON") from None
    if not isinstance(body, dict):
        raise EngineFailed("vLLM returned a body that is not a JSON object")
    return body


def _upstream_error(response: httpx.Response) -> Exception:
    """vLLM's error body: {"error": {"message", "type", "param", "code"}} (older: flat)."""
    message, param, kind = f"vLLM answered HTTP {response.status_code}", None, None
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            param = err.get("param")
            kind = err.get("type")
        elif isinstance(err, str):
            message = err
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    if 400 <= response.status_code < 500:
        return EngineRejected(response.status_code, message, param=param, kind=kind)
    return EngineFailed(f"vLLM error: {message}", status=response.status_code)


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
        models = await client.list_models(timeout=timeout)
    except httpx.HTTPStatusError as exc:
        return EngineStatus(state, False, f"vLLM answered HTTP {exc.response.status_code}")
    except (httpx.HTTPError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        return EngineStatus(state, False, f"vLLM unreachable at {client.base_url}: {reason}")
    if model_name not in models:
        return EngineStatus(
            state, False, f"vLLM does not serve {model_name!r} (it serves {', '.join(models)})"
        )
    return EngineStatus(state, True, "healthy")
