"""A fast OpenAI-compatible stub upstream for the benchmark (not a test fake: built for speed).

A raw asyncio HTTP/1.1 server (uvloop + the httptools parser, keep-alive, no framework) so that
its own cost, about 0.1 ms a request on one core, is small beside the gateway's. It serves:

- `POST /v1/chat/completions` — a `chat.completion` with `usage`; with `"stream": true`, a
  server-sent event stream: a role chunk, N content chunks (N = `max_tokens`, default 8), a
  finish chunk, a usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`.
  Each content chunk's text is the stub's `time.monotonic_ns()` at the moment it was written
  (then a space), so a client on this machine can tell how long each chunk took to reach it
  (CLOCK_MONOTONIC is shared by all processes). Between content chunks the stub waits the
  current chunk delay (none before the first, so time to first token has no delay in it).
- `GET /v1/models` — lists `bench-model` (or `--model`).
- `GET /health` — 200 with an empty body, as vLLM's (vllm-router waits for it before it starts).
- `POST /_bench/config` — `{"chunk_delay": seconds}` sets the chunk delay of later streams
  (the gateway does not pass arbitrary fields through in every shape, so the benchmark sets it
  here between its phases).

Usage: `python bench/stub_upstream.py [--host 127.0.0.1] [--port 0]`; the first line on stdout is
`PORT <n>` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any, cast

import httptools
import orjson

MODEL = "bench-model"
DEFAULT_CHUNKS = 8
CONTENT = "hello"
PROMPT_TOKENS = 9

_STATUS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


class Settings:
    """Mutable server-wide settings (changed by POST /_bench/config)."""

    def __init__(self, model: str, chunk_delay: float) -> None:
        self.model = model
        self.chunk_delay = chunk_delay


def head(status: int, content_type: bytes, length: int | None) -> bytes:
    """Status line and headers; `length=None` means a chunked body."""
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n%s\r\n\r\n" % (
        status,
        _STATUS.get(status, b"OK"),
        content_type,
        framing,
    )


def json_response(status: int, body: Any) -> bytes:
    raw = orjson.dumps(body)
    return head(status, b"application/json", len(raw)) + raw


def error_response(status: int, message: str) -> bytes:
    return json_response(
        status,
        {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}},
    )


def completion_body(model: str, n: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join([CONTENT] * n)},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": n,
            "total_tokens": PROMPT_TOKENS + n,
        },
    }


def sse_chunk(payload: bytes) -> bytes:
    """One server-sent event as one HTTP chunk."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


class StreamEvents:
    """The events of one chat.completion.chunk stream, built as they are sent."""

    def __init__(self, model: str) -> None:
        base = b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":%d,"model":%s,'
        self.prefix = base % (int(time.time()), orjson.dumps(model))

    def role(self) -> bytes:
        delta = b'{"role":"assistant","content":""}'
        body = b'"choices":[{"index":0,"delta":%s,"finish_reason":null}]}' % delta
        return sse_chunk(self.prefix + body)

    def content(self) -> bytes:
        text = b"%d " % time.monotonic_ns()
        body = b'"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}' % text
        return sse_chunk(self.prefix + body)

    def finish(self) -> bytes:
        body = b'"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}'
        return sse_chunk(self.prefix + body)

    def usage(self, n: int) -> bytes:
        usage = orjson.dumps(
            {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": n,
                "total_tokens": PROMPT_TOKENS + n,
            }
        )
        return sse_chunk(self.prefix + b'"choices":[],"usage":' + usage + b"}")

    @staticmethod
    def done() -> bytes:
        return sse_chunk(b"[DONE]") + b"0\r\n\r\n"


class StubProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: requests in order, keep-alive, streams written by a task."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.stream_task: asyncio.Task[None] | None = None

    # -- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream_task is not None:
            self.stream_task.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.send(error_response(400, "malformed HTTP request"), keep_alive=False)

    # -- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if path == b"/v1/chat/completions" and method == b"POST":
            self.chat(b"".join(self.body), keep_alive)
        elif path == b"/v1/models" and method == b"GET":
            models = {"object": "list", "data": [{"id": self.settings.model, "object": "model"}]}
            self.send(json_response(200, models), keep_alive)
        elif path == b"/health" and method == b"GET":
            self.send(head(200, b"application/json", 0), keep_alive)
        elif path == b"/_bench/config" and method == b"POST":
            self.configure(b"".join(self.body), keep_alive)
        else:
            self.send(error_response(404, f"no route {path.decode(errors='replace')}"), keep_alive)

    # -- handlers --------------------------------------------------------------------------
    def send(self, data: bytes, keep_alive: bool = True) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if not keep_alive:
            self.transport.close()

    def configure(self, raw: bytes, keep_alive: bool) -> None:
        try:
            self.settings.chunk_delay = float(orjson.loads(raw)["chunk_delay"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.send(error_response(400, 'expected {"chunk_delay": seconds}'), keep_alive)
            return
        self.send(json_response(200, {"chunk_delay": self.settings.chunk_delay}), keep_alive)

    def chat(self, raw: bytes, keep_alive: bool) -> None:
        try:
            request = orjson.loads(raw)
            n = int(request.get("max_tokens") or DEFAULT_CHUNKS)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            self.send(error_response(400, "body: invalid chat request"), keep_alive)
            return
        model = request.get("model") or self.settings.model
        if not request.get("stream"):
            self.send(json_response(200, completion_body(model, n)), keep_alive)
            return
        options = request.get("stream_options") or {}
        usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
        if self.transport is not None:
            self.transport.pause_reading()  # no pipelining while a stream is written
        self.stream_task = asyncio.get_running_loop().create_task(
            self.stream(StreamEvents(model), n, usage, keep_alive)
        )

    async def stream(self, events: StreamEvents, n: int, usage: bool, keep_alive: bool) -> None:
        delay = self.settings.chunk_delay
        self.send(head(200, b"text/event-stream", None) + events.role() + events.content())
        for _ in range(n - 1):
            if delay > 0:
                await asyncio.sleep(delay)
            self.send(events.content())
        tail = events.finish() + (events.usage(n) if usage else b"") + events.done()
        self.send(tail, keep_alive)
        self.stream_task = None
        if self.transport is not None and keep_alive:
            self.transport.resume_reading()


async def serve(host: str, port: int, settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: StubProtocol(settings), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    args = parser.parse_args()
    settings = Settings(args.model, args.chunk_delay)
    try:
        import uvloop
    except ImportError:  # still works, only slower
        uvloop = None
    runner = asyncio.run if uvloop is None else uvloop.run
    try:
        runner(serve(args.host, args.port, settings))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
