"""HTTP client for vLLM's OpenAI-compatible server: httpx requests and responses on one pooled
httpx transport, httpx-aiohttp's, so aiohttp keeps the connections and parses HTTP/1.1.

Every method raises the domain's Engine* errors (EngineUnavailable, EngineTimeout, EngineFailed):
httpx and aiohttp types stay in this module.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import aclosing
from typing import Any

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from tide_vllm.domain.chat.entity import (
    ChatError,
    EngineFailed,
    EngineTimeout,
    EngineUnavailable,
    EngineUnreachable,
)

# Headers that describe one connection, not the message (RFC 9110 7.6.1): never relayed.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# A caller's request headers that the client sets itself: the message's framing (httpx and
# aiohttp write it), the encodings it accepts (it asks for none), vLLM's key and the request id.
_SET_HERE = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"accept-encoding",
    b"authorization",
    b"x-request-id",
}
# The content codings httpx decodes here: br and zstd only with their optional packages.
_BROTLI = importlib.util.find_spec("brotli") or importlib.util.find_spec("brotlicffi")
DECODABLE = frozenset(
    {"identity", "gzip", "deflate"}
    | ({"br"} if _BROTLI else set())
    | ({"zstd"} if importlib.util.find_spec("zstandard") else set())
)
# Below vLLM's (uvicorn's) keep-alive timeout of 5 s: an idle connection is closed by us before
# vLLM closes it, so a request is never written on a connection vLLM is closing at that moment.
KEEPALIVE_EXPIRY = 3.0


class Answer:
    """vLLM's answer once its head is in, its body still to be read: the status, the headers
    without hop-by-hop ones (lower-case names), and the body as it arrives, decoded when vLLM
    (or a proxy in front of it) used a content coding. Iterating or `read` raises the domain's
    errors. `aclose` before the body's end closes the connection, which makes vLLM abort the
    generation."""

    __slots__ = ("status", "headers", "_response", "_client", "_decoded")

    def __init__(
        self,
        response: httpx.Response,
        headers: list[tuple[bytes, bytes]],
        decoded: bool,
        client: VLLMClient,
    ) -> None:
        self.status = response.status_code
        self.headers = headers
        self._response = response
        self._decoded = decoded
        self._client = client

    def header(self, name: bytes) -> str:
        """The value of a header (`name` in lower case), or ""."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return ""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        # The bytes as they come (aiohttp hands over what the socket gave, up to 16 KiB). A
        # body without a content coding is read from the transport's stream itself, without
        # httpx's two layers of generators for decoding (aiter_bytes) and accounting (aiter_raw).
        response = self._response
        try:
            if self._decoded:
                async with aclosing(response.aiter_bytes()) as chunks:
                    async for chunk in chunks:
                        yield chunk
            else:
                async for chunk in response.stream:  # type: ignore[union-attr]
                    yield chunk
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            raise self._client.error(exc) from None

    async def read(self) -> bytes:
        """The rest of the body; then the answer is closed."""
        try:
            return b"".join([chunk async for chunk in self])
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        except (httpx.HTTPError, aiohttp.ClientError):
            pass  # closing a connection that is already broken


class VLLMClient:
    """Sends requests to vLLM and returns its answers as `Answer`s, translating the HTTP
    libraries' errors into the domain's, so neither leaves infrastructure.

    A request that vLLM may have received is never sent twice: only a failure to connect is
    tried again, once. (aiohttp would resend an idempotent request, GET or DELETE, whose
    connection closes before the answer; `_at_most_once` stops that.)"""

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
        if api_key and ("\r" in api_key or "\n" in api_key):
            raise ValueError("a CR or LF in vLLM's API key")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.pool_size = pool_size
        # The pool is shared by every request and sized for the concurrency tide-vllm admits
        # (vLLM batches, so let them all through). `transport` is for tests (respx, MockTransport).
        # Requests go to the transport itself (its public `handle_async_request`), not through an
        # httpx.AsyncClient: AsyncClient.send ties each response to a stream that points back at
        # it, a reference cycle per request that only the garbage collector's full passes free
        # (the service's memory grew by megabytes between them), and keeps vLLM's cookies, while
        # nothing it adds (auth flows, redirects, cookies, hooks) is wanted here.
        self._transport = transport or AiohttpTransport(client=self._session)
        auth = [(b"authorization", b"Bearer %s" % api_key.encode())] if api_key else []
        self._headers = [(b"accept-encoding", b"identity"), *auth]
        # For a stream, `read` bounds the wait for each chunk, the first one included.
        connect = min(connect_timeout, timeout)
        self._timeouts = {"connect": connect, "read": timeout, "write": timeout, "pool": timeout}
        self._extensions = {"timeout": self._timeouts}
        self._chat_url = httpx.URL(self.base_url + "/v1/chat/completions")
        self._host = self._chat_url.netloc
        self._chat_headers = [
            (b"host", self._host),
            (b"content-type", b"application/json"),
            *self._headers,
        ]

    def _session(self) -> aiohttp.ClientSession:
        """aiohttp's session, made on the first request (it needs the running loop)."""
        connector = aiohttp.TCPConnector(
            limit=self.pool_size, limit_per_host=0, keepalive_timeout=KEEPALIVE_EXPIRY
        )
        return aiohttp.ClientSession(
            connector=connector,
            # No cookie is kept between requests: they come from different callers.
            cookie_jar=aiohttp.DummyCookieJar(),
            # A relayed request goes with the headers it has, none invented (Content-Type …).
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            middlewares=(_at_most_once,),
        )

    # -- requests -------------------------------------------------------------------------
    async def open(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | AsyncIterator[bytes] = b"",
        request_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Answer:
        """Send any request to vLLM (`path` with its query) and return the answer once its
        head is in. `headers` are the caller's: hop-by-hop ones and those the client sets itself
        (Host, Content-Length, Accept-Encoding, Authorization, X-Request-Id) are dropped; a
        streamed `body` keeps the caller's Content-Length if it has one, and is sent chunked
        otherwise. The body is sent as it is, never re-encoded. The caller closes the answer."""
        sent = [(b"host", self._host), *self._headers]
        length = None
        for name, value in headers:
            key = name.lower()
            if key == b"content-length":
                length = value
            elif key not in _SET_HERE:
                sent.append((key, value))
        if request_id is not None:
            sent.append((b"x-request-id", request_id.encode()))
        extensions = self._extensions
        if timeout is not None:
            extensions = {"timeout": {**self._timeouts, "read": timeout, "pool": timeout}}
        try:
            url = httpx.URL(self.base_url + path)
            if isinstance(body, bytes):
                if body or method.upper() in ("POST", "PUT", "PATCH"):
                    sent.append((b"content-length", b"%d" % len(body)))
                request = _request(method, url, sent, body, extensions)
            else:  # httpx streams it, chunked unless the caller gave its length
                if length is not None:
                    sent.append((b"content-length", length))
                request = httpx.Request(
                    method, url, headers=sent, content=body, extensions=extensions
                )
        except httpx.InvalidURL as exc:
            raise ValueError(f"cannot send {method} {path} to vLLM: {exc}") from None
        return await self._send(request)

    async def open_chat(self, payload: Mapping[str, Any], request_id: str) -> Answer:
        """POST /v1/chat/completions with `payload` as JSON."""
        body = orjson.dumps(payload)
        headers = [
            *self._chat_headers,
            (b"x-request-id", request_id.encode()),
            (b"content-length", b"%d" % len(body)),
        ]
        return await self._send(_request("POST", self._chat_url, headers, body, self._extensions))

    async def aclose(self) -> None:
        await self._transport.aclose()

    # -- the transport --------------------------------------------------------------------
    async def _send(self, request: httpx.Request) -> Answer:
        try:
            response = await self._transport.handle_async_request(request)
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            if not _not_connected(exc):
                raise self.error(exc) from None
            # Nothing reached vLLM: one more try, on a new connection.
            try:
                response = await self._transport.handle_async_request(request)
            except (httpx.HTTPError, aiohttp.ClientError) as again:
                raise self.error(again) from None
        try:
            headers, decoded = self._answer_headers(response)
        except BaseException:
            await response.aclose()
            raise
        return Answer(response, headers, decoded, self)

    def _answer_headers(self, response: httpx.Response) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The answer's end-to-end headers, and whether its body is to be decoded (then without
        Content-Encoding and Content-Length). A coding that cannot be decoded is an
        EngineFailed."""
        raw = response.headers.raw
        named = {b"connection"}
        decoded = False
        for name, value in raw:
            key = name.lower()
            if key == b"connection":
                named.update(token.strip().lower() for token in value.split(b","))
            elif key == b"transfer-encoding":
                codings = {token.strip().lower() for token in value.split(b",")}
                if codings - {b"chunked"}:
                    raise EngineFailed(
                        f"vLLM answered with a transfer coding tide-vllm cannot read: "
                        f"{value.decode('latin-1')!r}"
                    )
            elif key == b"content-encoding":
                codings = {token.strip().lower() for token in value.split(b",")} - {b""}
                unknown = {c.decode("latin-1") for c in codings} - DECODABLE
                if unknown:
                    raise EngineFailed(
                        "vLLM answered with a content coding tide-vllm cannot decode: "
                        + ", ".join(sorted(unknown))
                    )
                decoded = decoded or bool(codings - {b"identity"})
        dropped = HOP_BY_HOP | named
        if decoded:
            dropped = dropped | {b"content-encoding", b"content-length"}
        return [(k, v) for k, v in ((n.lower(), v) for n, v in raw) if k not in dropped], decoded

    def error(self, exc: Exception) -> ChatError:
        """An error of httpx or aiohttp as the domain's: vLLM unreachable → unavailable, slow →
        timeout, gone mid-answer → unavailable ("lost the connection"), an answer that is not
        HTTP or cannot be decoded → failed (502). httpx-aiohttp turns aiohttp's errors into
        coarser httpx ones (a refused connection and a closed one both become ConnectTimeout),
        so aiohttp's own error, its cause, is read first."""
        cause = exc.__cause__ if isinstance(exc.__cause__, aiohttp.ClientError) else exc
        reason = str(cause) or type(cause).__name__
        if isinstance(cause, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
            return EngineUnreachable(f"cannot reach vLLM at {self.base_url}: {reason}")
        if isinstance(cause, (httpx.ConnectError, httpx.ConnectTimeout)):
            return EngineUnreachable(f"cannot reach vLLM at {self.base_url}: {reason}")
        if isinstance(cause, (asyncio.TimeoutError, httpx.TimeoutException)):
            return EngineTimeout(f"vLLM did not answer within {self.timeout:g}s")
        if isinstance(cause, aiohttp.ClientResponseError):  # a head aiohttp cannot parse
            what = " ".join(str(cause.message).split())  # aiohttp's points at the bad byte
            return EngineFailed(f"vLLM sent an answer that is not valid HTTP: {what:.200}")
        if isinstance(cause, httpx.DecodingError):
            return EngineFailed(f"vLLM sent a body that cannot be decoded: {reason:.200}")
        if isinstance(cause, aiohttp.InvalidURL | httpx.UnsupportedProtocol | httpx.InvalidURL):
            return EngineUnavailable(f"cannot reach vLLM at {self.base_url}: {reason}")
        # The connection broke before the answer's end (a body cut off included): vLLM went
        # away, or something between us did.
        return EngineUnavailable(f"lost the connection to vLLM: {reason}")


def _request(
    method: str,
    url: httpx.URL,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    extensions: dict[str, Any],
) -> httpx.Request:
    """An httpx.Request whose headers are complete (Host, Content-Length): made from a stream,
    httpx adds none and builds its headers once, a third of the time `content=` takes."""
    request = httpx.Request(
        method, url, headers=headers, stream=httpx.ByteStream(body), extensions=extensions
    )
    request.read()  # the body as bytes, which httpx-aiohttp hands to aiohttp as they are
    return request


def _not_connected(exc: BaseException) -> bool:
    """Whether a request failed before any connection to vLLM was made (nothing was sent)."""
    cause = exc.__cause__ if isinstance(exc.__cause__, aiohttp.ClientError) else exc
    if isinstance(cause, aiohttp.ClientError):
        return isinstance(cause, aiohttp.ClientConnectorError)
    return isinstance(cause, httpx.ConnectError)


async def _at_most_once(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """An aiohttp client middleware. aiohttp sends an idempotent request (GET, PUT, DELETE …)
    once more when its connection closes before the answer's head, whether or not the server
    got it (its session has no setting for this). vLLM may have received and run it, so the
    error is passed on as one that aiohttp does not retry."""
    try:
        return await handler(request)
    except aiohttp.ClientConnectorError:
        raise  # never connected: nothing was sent, and aiohttp does not retry it either
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        message = str(exc) or type(exc).__name__
        raise aiohttp.ServerConnectionError(f"vLLM closed the connection: {message}") from exc
