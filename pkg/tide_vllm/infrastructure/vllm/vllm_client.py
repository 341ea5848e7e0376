"""HTTP client for vLLM's OpenAI-compatible server: one pooled httpx.AsyncClient."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import orjson

from .http11 import Http11Transport


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer of vLLM: what the repository reads of it."""

    status_code: int
    content_type: str
    content: bytes


class Answer(Protocol):
    """An answer whose head is in and whose body is still to be read: what the transport
    gives (http11's response stream) or, for another httpx transport, an httpx.Response seen
    the same way (`_HttpxAnswer`)."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class _HttpxAnswer:
    """An httpx.Response from any httpx transport (a test's MockTransport) as an Answer."""

    __slots__ = ("status", "headers", "_stream")

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.headers = response.headers.raw
        self._stream: httpx.AsyncByteStream = response.stream  # type: ignore[assignment]

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()

    async def aclose(self) -> None:
        await self._stream.aclose()


def header(answer: Answer, name: bytes) -> str:
    """The value of a header of the answer (`name` in lower case), or ""."""
    for key, value in answer.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


async def read_body(answer: Answer) -> bytes:
    """The rest of the answer's body, as it came (vLLM is not asked to compress: no
    Accept-Encoding is sent); then the answer is closed."""
    try:
        content = b"".join([chunk async for chunk in answer])
    finally:
        await answer.aclose()
    encoding = header(answer, b"content-encoding")
    if encoding:  # a server that compresses anyway: httpx's decoders
        decoded = httpx.Response(200, headers={"content-encoding": encoding}, content=content)
        return decoded.content
    return content


class VLLMClient:
    """Thin transport: sends requests and returns responses; errors are translated by callers
    in this package (vllm_repository), so httpx never leaves infrastructure."""

    def __init__(
        self,
        base_url: str,
        timeout: float,
        *,
        api_key: str | None = None,
        connect_timeout: float = 5.0,
        pool_size: int = 1024,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # The pool is shared by every request and sized for the concurrency tide-vllm admits
        # (vLLM batches, so let them all through). httpx's own transport collapsed at 32
        # connections on the measuring machine; httpx-aiohttp's was three times faster, and
        # Http11Transport (http11.py) costs a fraction of aiohttp's CPU per request.
        self._transport = transport or Http11Transport(max_connections=pool_size)
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            # For a stream, `read` bounds the wait for each chunk, the first one included.
            timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)),
            transport=self._transport,
        )
        # The chat path goes straight to the transport with a request built from parts made
        # once: AsyncClient's per-request work (URL merging, cookies, auth and redirect
        # handling) was a sixth of the gateway's CPU time per request, and none is needed.
        self._chat_url = httpx.URL(base_url.rstrip("/") + "/v1/chat/completions")
        self._chat_headers = [
            (b"host", self._chat_url.netloc),
            (b"content-type", b"application/json"),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ]
        connect = min(connect_timeout, timeout)
        self._timeouts = {"connect": connect, "read": timeout, "write": timeout, "pool": timeout}
        self._chat_extensions = {"timeout": self._timeouts}
        self._fast = self._transport if isinstance(self._transport, Http11Transport) else None
        self._host, self._port = self._chat_url.host, self._chat_url.port or 80
        self._chat_head = b"POST %s HTTP/1.1\r\n%s" % (
            self._chat_url.raw_path,
            b"".join([b"%s: %s\r\n" % kv for kv in self._chat_headers]),
        )
        if self._chat_head.count(b"\n") != len(self._chat_headers) + 1:
            raise ValueError("a CR or LF in vLLM's address or API key")

    def _chat_request(self, body: bytes, request_id: str) -> httpx.Request:
        return httpx.Request(
            "POST",
            self._chat_url,
            headers=[
                *self._chat_headers,
                (b"x-request-id", request_id.encode()),
                (b"content-length", b"%d" % len(body)),
            ],
            content=body,
            extensions=self._chat_extensions,
        )

    async def open_chat_stream(self, payload: Mapping[str, Any], request_id: str) -> Answer:
        """POST /v1/chat/completions; the answer once its head is in, its body unread: the
        caller closes it (`aclose`), which, before the body's end, closes the connection and
        so makes vLLM abort the generation. On Http11Transport (always, outside tests) the
        request is written as bytes from a head made once and sent with `send_bytes`: building
        and reading httpx's Request and Response objects was a tenth of the gateway's CPU time
        per request (py-spy). Any other httpx transport gets an httpx.Request. Errors are
        httpx's either way."""
        body = orjson.dumps(payload)
        rid = request_id.encode()
        if b"\r" in rid or b"\n" in rid:
            raise ValueError("a request id cannot hold CR or LF")
        fast = self._fast
        if fast is not None:
            data = b"%sx-request-id: %s\r\ncontent-length: %d\r\n\r\n%s" % (
                self._chat_head, rid, len(body), body,
            )  # fmt: skip
            return await fast.send_bytes(self._host, self._port, data, self._timeouts)
        response = await self._transport.handle_async_request(self._chat_request(body, request_id))
        return _HttpxAnswer(response)

    async def chat_completions(self, payload: Mapping[str, Any], request_id: str) -> Reply:
        """The whole answer."""
        answer = await self.open_chat_stream(payload, request_id)
        content = await read_body(answer)
        return Reply(answer.status, header(answer, b"content-type"), content)

    async def get_models(self, timeout: float | None = None) -> httpx.Response:
        return await self._http.get(
            "/v1/models", timeout=self.timeout if timeout is None else timeout
        )

    async def get_metrics(self) -> httpx.Response:
        return await self._http.get("/metrics")

    async def list_models(self, timeout: float | None = None) -> list[str]:
        """Ids of the models vLLM serves; raises httpx errors and ValueError on a bad body."""
        response = await self.get_models(timeout)
        response.raise_for_status()
        data = response.json().get("data")
        if not isinstance(data, list):
            raise ValueError("GET /v1/models did not return a model list")
        return [str(item.get("id")) for item in data if isinstance(item, dict)]

    async def aclose(self) -> None:
        await self._http.aclose()
