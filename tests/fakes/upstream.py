"""A fake OpenAI-compatible upstream (vLLM's API surface) for fidelity, SDK and fault tests.

It records every request it receives and every stream or request the client abandoned, so
tests can assert what vLLM would have seen. The user's last message steers it:
  "hang"  — answer nothing for 30 s (the non-streaming body is sent as a stream, so the server
            notices a disconnect, as vLLM does, and records it)
  "slow"  — stream 100 chunks, 50 ms apart
  "held"  — a stream whose head is sent at once and whose events wait for `recorder.release`
  "fail500" — a 500 with vLLM's error body;  "html" — a 200 that is not JSON
Anything else gets a quick answer. Model "fake-model" is served; any other is a 404.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "fake-model"


@dataclass
class Recorder:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    abandoned: list[float] = field(default_factory=list)  # monotonic time of each abandonment
    peers: list[tuple[str, int]] = field(default_factory=list)  # the client's address, each request
    release: threading.Event = field(default_factory=threading.Event)  # lets "held" streams go

    def __post_init__(self) -> None:
        self.release.set()

    def clear(self) -> None:
        self.bodies.clear()
        self.headers.clear()
        self.abandoned.clear()
        self.peers.clear()


def completion(body: dict[str, Any]) -> dict[str, Any]:
    n = body.get("n") or 1
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "Hello from the fake.",
        "tool_calls": [],
        "reasoning_content": None,
    }
    if body.get("tools"):
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": body["tools"][0]["function"]["name"],
                        "arguments": '{"city": "Paris"}',
                    },
                }
            ],
        }
    logprobs = (
        {"content": [{"token": "Hello", "logprob": -0.1, "bytes": [72], "top_logprobs": []}]}
        if body.get("logprobs")
        else None
    )
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": body["model"],
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": i,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": "tool_calls" if body.get("tools") else "stop",
                "stop_reason": None,
            }
            for i in range(n)
        ],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 5,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def chunk(
    body: dict[str, Any], delta: dict[str, Any], finish: str | None = None, index: int = 0
) -> bytes:
    data = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": body["model"],
        "system_fingerprint": "fp_fake",
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def error(status: int, message: str, kind: str, param: str | None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}},
        status_code=status,
    )


def build_upstream(recorder: Recorder) -> Starlette:
    async def chat(request: Request) -> Response:
        try:
            return await answer(request)
        except Exception as exc:  # like vLLM: a request it cannot read is a 400
            return error(400, f"invalid request: {exc!r}", "BadRequestError", None)

    async def answer(request: Request) -> Response:
        body = await request.json()
        recorder.bodies.append(body)
        recorder.headers.append(dict(request.headers))
        if request.client is not None:
            recorder.peers.append((request.client.host, request.client.port))
        if body.get("model") != MODEL:
            return error(
                404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", "model"
            )
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens > 4096):
            return error(
                400,
                "max_tokens must be an integer within the context (4096 tokens).",
                "BadRequestError",
                "max_tokens",
            )
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] < 1:
            return error(
                400, "max_tokens must be at least 1, got -1.", "BadRequestError", "max_tokens"
            )
        last = body["messages"][-1].get("content")
        if last == "fail500":
            return error(500, "EngineCore encountered an issue.", "InternalServerError", None)
        if last == "html":
            return Response("<html>502 Bad Gateway</html>", media_type="text/html")
        if body.get("stream"):
            return StreamingResponse(stream(body, last), media_type="text/event-stream")
        if last == "hang":
            return StreamingResponse(hang(), media_type="application/json")
        return JSONResponse(completion(body))

    async def hang():
        try:
            await asyncio.sleep(30)
            yield b"{}"
        except BaseException:
            recorder.abandoned.append(time.monotonic())
            raise

    async def stream(body: dict[str, Any], last: Any):
        finished = False
        try:
            while last == "held" and not recorder.release.is_set():
                await asyncio.sleep(0.01)
            n = body.get("n") or 1
            for i in range(n):
                yield chunk(body, {"role": "assistant", "content": ""}, index=i)
            words = ["Hello", " from", " the", " fake", "."]
            if last == "slow":
                words = [f" w{i}" for i in range(100)]
            for word in words:
                if last == "slow":
                    await asyncio.sleep(0.05)
                for i in range(n):
                    yield chunk(body, {"content": word}, index=i)
            for i in range(n):
                yield chunk(body, {}, finish="stop", index=i)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 1700000000,
                    "model": body["model"],
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 9,
                        "completion_tokens": 5 * n,
                        "total_tokens": 9 + 5 * n,
                    },
                }
                yield b"data: " + json.dumps(usage).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            if last == "lingering end":  # the body's end comes a moment after [DONE]
                await asyncio.sleep(0.1)
            finished = True
        finally:
            if not finished:
                recorder.abandoned.append(time.monotonic())

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": MODEL,
                        "object": "model",
                        "created": 1700000000,
                        "owned_by": "vllm",
                        "root": "/models/fake",
                        "parent": None,
                        "max_model_len": 4096,
                    }
                ],
            }
        )

    async def metrics(request: Request) -> Response:
        return Response(
            "# HELP vllm:num_requests_running fake\nvllm:num_requests_running 0.0\n",
            media_type="text/plain; version=0.0.4",
        )

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models),
            Route("/metrics", metrics),
        ]
    )


class ServerThread:
    """An ASGI app served by uvicorn on a real port, in a thread with its own event loop."""

    def __init__(self, app: Any, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("server thread did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


# -- a raw HTTP/1.1 upstream, for answers no framework would send ------------------------------


@dataclass
class RawRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass
class RawConnection:
    """What the server knows about one accepted connection."""

    requests: int = 0
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)


def raw_response(body: bytes = b"", status: bytes = b"200 OK", headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), headers, body)


def raw_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _read_raw_request(reader: asyncio.StreamReader) -> RawRequest:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    method, target, _ = lines[0].split(b" ")
    headers = [(k, v) for k, v in (tuple(line.split(b": ", 1)) for line in lines[1:])]
    request = RawRequest(method, target, headers, b"")
    if (length := request.header(b"content-length")) is not None:
        request.body = await reader.readexactly(int(length))
    elif (request.header(b"transfer-encoding") or b"").lower() == b"chunked":
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            request.body += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
    return request


async def echo_target(request, reader, writer, conn) -> None:
    writer.write(raw_response(request.target))


class RawUpstream:
    """An HTTP/1.1 server on asyncio streams, in the test's own event loop, whose answers the
    test writes byte by byte: `handler(request, reader, writer, connection)` answers each
    request of a keep-alive connection; returning False closes the connection. It counts the
    connections and the requests it read, and notices a client closing a connection."""

    def __init__(self, handler=echo_target) -> None:
        self.handler = handler
        self.conns: list[RawConnection] = []
        self.requests: list[RawRequest] = []
        self.got_request = asyncio.Event()
        self.client_closed = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    @property
    def accepts(self) -> int:
        return len(self.conns)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConnection()
        self.conns.append(conn)
        self._writers.append(writer)
        try:
            while True:
                try:
                    request = await _read_raw_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    conn.client_closed.set()
                    self.client_closed.set()
                    return
                conn.requests += 1
                self.requests.append(request)
                self.got_request.set()
                if await self.handler(request, reader, writer, conn) is False:
                    return
                await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


if (
    __name__ == "__main__"
):  # a process of its own, for load tests: python -m tests.fakes.upstream PORT
    import sys

    uvicorn.run(
        build_upstream(Recorder()),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
    )
