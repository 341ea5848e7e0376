"""The web server's HTTP/1.1 protocol: uvicorn's httptools protocol with a leaner request cycle.

uvicorn keeps the connection handling (accepting, parsing with httptools, errors answered 400,
pipelining, flow control, shutdown, the keep-alive timeout); the request cycle, the part that
runs for every request, is this module's. It does what uvicorn's `RequestResponseCycle` does,
with less work per request, and it is what a relayed request spends most of its time in before
it reaches vLLM and after vLLM answers (measured: a third of tide-vllm's time to first token):

- no `asyncio.Event` per request: the body is handed over as it is (it usually arrives with the
  head, so nothing waits); a receive that must wait (for more body, or for the disconnect
  after it) waits on a future made only then;
- a response's head is built with one check of all its header names and one of all values (the
  same characters refused as uvicorn's two checks per header), and **held until its first body
  bytes**, which it leaves with: a whole answer is one write, and a stream's head leaves with
  its first event, so the client wakes once, with the first token in hand. Every write after
  the head goes out at once (the end of a response is never held). A head with no body in the
  same turn of the loop goes out at the turn's end;
- a request whose path is plain (no `%`, `?` or `#`: every API call) is not run through
  httptools' URL parser;
- one keep-alive timer per connection instead of one armed and cancelled per response (two
  timer operations per request, ~2 % of the gateway's CPU time): a response's end notes the
  time, and the timer, when it fires, closes the connection or waits the rest of the time.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import unquote

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

# The characters uvicorn refuses in a header name and in a value (one class each, so a check of
# all names or values joined together refuses exactly what a check of each would).
_BAD_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
_NOT_PLAIN = re.compile(rb"[%?#]")  # a path to run through httptools' URL parser
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))
_DISCONNECT = {"type": "http.disconnect"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class _DefaultHeaders:
    """uvicorn's default headers (server, date) as head lines: uvicorn replaces its list when
    the date changes, once a second, and the lines are made again only then."""

    __slots__ = ("of", "lines")

    def __init__(self) -> None:
        self.of: list[tuple[bytes, bytes]] | None = None
        self.lines = b""


_DEFAULTS = _DefaultHeaders()


def _header_lines(headers: list[Any]) -> tuple[list[bytes], list[bytes], bytes]:
    """Headers' names (lower case) and values, checked as uvicorn checks them, and their lines
    in a response's head."""
    if not headers:
        return [], [], b""
    raw_names = [name for name, _ in headers]
    values = [value for _, value in headers]
    if _BAD_NAME.search(b"".join(raw_names)):
        raise RuntimeError("Invalid HTTP header name.")
    if _BAD_VALUE.search(b"".join(values)):
        raise RuntimeError("Invalid HTTP header value.")
    # Lower-cased all at once: no name holds a newline (checked just above).
    names = b"\n".join(raw_names).lower().split(b"\n")
    lines = b"\r\n".join(map(b": ".join, zip(names, values, strict=True))) + b"\r\n"
    return names, values, lines


def _defaults(server_state: Any) -> bytes:
    headers = server_state.default_headers
    if headers is not _DEFAULTS.of:
        _DEFAULTS.lines = _header_lines(headers)[2]
        _DEFAULTS.of = headers
    return _DEFAULTS.lines


class RequestCycle:
    """One request and its response, on the ASGI interface (`receive`, `send`)."""

    __slots__ = (
        "scope", "protocol", "transport", "flow", "loop", "keep_alive", "expect_100",
        "body", "more_body", "ready", "waiters", "disconnected", "response_started",
        "response_complete",
        "chunked", "length_left", "head_only", "held",
    )  # fmt: skip

    def __init__(
        self, scope: dict[str, Any], protocol: GatewayHttpProtocol, keep_alive: bool, expect: bool
    ) -> None:
        self.scope = scope
        self.protocol = protocol
        self.transport = protocol.transport
        self.flow = protocol.flow
        self.loop = protocol.loop
        self.keep_alive = keep_alive
        self.expect_100 = expect
        self.body = b""
        self.more_body = True
        self.ready = False  # something for `receive`: body, its end, or the disconnect
        self.waiters: list[asyncio.Future[None]] | None = None
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self.length_left = 0
        self.head_only = scope["method"] == "HEAD"
        self.held: bytes | None = None  # the response's head, until its first body bytes

    # -- from the protocol ----------------------------------------------------------------
    def add_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        self.wake()

    def end_body(self) -> None:
        self.more_body = False
        self.wake()

    def lost(self) -> None:
        if not self.response_complete:
            self.disconnected = True
        self.held = None
        self.wake()

    def wake(self) -> None:
        self.ready = True
        waiters = self.waiters
        if waiters is not None:
            self.waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # -- ASGI -------------------------------------------------------------------------------
    async def run_asgi(self, app: Any) -> None:
        """uvicorn's: an exception is logged and answered 500 (or the connection closed, if
        the response had started); so is an app that returns without a whole response."""
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            self.protocol.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self._send_500()
            else:
                self._close()
        else:
            log = self.protocol.logger
            if result is not None:
                log.error("ASGI callable should return None, but returned '%s'.", result)
                self._close()
            elif not self.response_started and not self.disconnected:
                log.error("ASGI callable returned without starting response.")
                await self._send_500()
            elif not self.response_complete and not self.disconnected:
                log.error("ASGI callable returned without completing response.")
                self._close()

    async def receive(self) -> dict[str, Any]:
        if self.expect_100:
            self.expect_100 = False
            if not self.transport.is_closing():
                self.transport.write(_CONTINUE)
        if not self.ready and not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            waiter = self.loop.create_future()
            if self.waiters is None:
                self.waiters = [waiter]
            else:
                self.waiters.append(waiter)
            await waiter
        self.ready = False
        if self.disconnected or self.response_complete:
            return _DISCONNECT
        body, self.body = self.body, b""
        if self.more_body:
            self.flow.resume_reading()
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: dict[str, Any]) -> None:
        flow = self.flow
        if flow.write_paused and not self.disconnected:
            await flow.drain()
        if self.disconnected:
            return
        if self.response_started:
            self._send_body(message)
        else:
            self._send_head(message)

    def _send_head(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.response.start":
            raise RuntimeError(
                f"Expected ASGI message 'http.response.start', but got '{message['type']}'."
            )
        self.response_started = True
        self.expect_100 = False
        status = message["status"]
        headers = message.get("headers", ())
        if type(headers) is not list:  # any iterable of pairs, as ASGI allows: read once
            headers = list(headers)
        framed = close = False
        names, values, lines = _header_lines(headers)
        if not _FRAMING.isdisjoint(names):
            for name, value in zip(names, values, strict=True):
                if name == b"content-length":
                    if not framed:
                        self.length_left = int(value.decode())
                        framed = True
                elif name == b"transfer-encoding":
                    if value.lower() == b"chunked":
                        self.length_left = 0
                        self.chunked = framed = True
                elif name == b"connection" and b"close" in [
                    token.lower().strip() for token in value.split(b",")
                ]:
                    self.keep_alive = False
                    close = True
        head = [STATUS_LINE[status], _defaults(self.protocol.server_state), lines]
        if not self.keep_alive and not close:
            head.append(b"connection: close\r\n")
        if not framed and not self.head_only and status not in (204, 304):
            self.chunked = True
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        self.held = b"".join(head)
        self.loop.call_soon(self._flush)

    def _send_body(self, message: dict[str, Any]) -> None:
        if self.response_complete:
            raise RuntimeError(
                f"Unexpected ASGI message '{message['type']}' sent, after response already "
                "completed."
            )
        if message["type"] != "http.response.body":
            raise RuntimeError(
                f"Expected ASGI message 'http.response.body', but got '{message['type']}'."
            )
        body: bytes = message.get("body", b"")
        more_body: bool = message.get("more_body", False)
        if self.head_only:
            data = b""
            self.length_left = 0
        elif self.chunked:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more_body:
                data += _LAST_CHUNK
        else:
            if len(body) > self.length_left:
                raise RuntimeError("Response content longer than Content-Length")
            self.length_left -= len(body)
            data = body
        held = self.held
        if held is not None:
            if data or not more_body:
                self.held = None
                self.transport.write(held + data)
        elif data:
            self.transport.write(data)
        if not more_body:
            if self.length_left != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.wake()
            if not self.keep_alive:
                self.transport.close()
            self.protocol.on_response_complete()

    def _flush(self) -> None:
        held = self.held
        if held is not None:
            self.held = None
            if not self.transport.is_closing():
                self.transport.write(held)

    def _close(self) -> None:
        self._flush()
        self.transport.close()

    async def _send_500(self) -> None:
        await self.send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", b"21"),
                    (b"connection", b"close"),
                ],
            }
        )
        await self.send({"type": "http.response.body", "body": b"Internal Server Error"})


class GatewayHttpProtocol(HttpToolsProtocol):
    cycle: RequestCycle  # type: ignore[assignment]
    _idle_since: float | None = None  # when the last response ended, if nothing came since
    _scope_base: dict[str, Any]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._scope_base = {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": self.root_path,
        }

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        cycle = self.cycle
        if cycle is not None:
            cycle.lost()
        if self.flow is not None:
            self.flow.resume_writing()
        if exc is None:
            self.transport.close()
        timer = self.timeout_keep_alive_task
        if timer is not None:
            self.timeout_keep_alive_task = None
            timer.cancel()
        self.parser = None  # type: ignore[assignment]

    def _unset_keepalive_if_required(self) -> None:
        # Called by uvicorn when data arrives: the connection is not idle (the timer stays).
        self._idle_since = None

    # -- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        scope = self.scope = self._scope_base.copy()  # type: ignore[assignment]
        scope["headers"] = self.headers
        scope["state"] = self.app_state.copy()

    def on_headers_complete(self) -> None:
        parser = self.parser
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        url = self.url
        if url[:1] == b"/" and not _NOT_PLAIN.search(url):
            raw_path, query = url, b""
            path = url.decode("ascii")
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path, parsed.query or b""
            path = raw_path.decode("ascii")
            if "%" in path:
                path = unquote(path)
        root = self.root_path
        scope["path"] = root + path if root else path
        scope["raw_path"] = root.encode("ascii") + raw_path if root else raw_path
        scope["query_string"] = query
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        else:
            app = self.app
        previous = self.cycle
        keep_alive = http_version != "1.0" and parser.should_keep_alive()
        self.cycle = cycle = RequestCycle(scope, self, keep_alive, self.expect_100_continue)
        if previous is None or previous.response_complete:
            self._start_asgi_task(cycle, app)  # type: ignore[arg-type]
        else:  # pipelined: after the responses before it
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))  # type: ignore[arg-type]

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
            return
        cycle.add_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
            return
        cycle.end_body()

    # -- the end of a response: keep-alive ----------------------------------------------------
    def on_response_complete(self) -> None:
        if self.pipeline or self.transport.is_closing():
            super().on_response_complete()  # starts the next pipelined request; arms no timer
            return
        # uvicorn's otherwise, with the keep-alive timer armed only if none is.
        self.server_state.total_requests += 1
        self.flow.resume_reading()
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_due
            )

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        idle_since = self._idle_since
        if idle_since is None:
            return  # busy: the next response's end arms the timer again
        left = idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()
