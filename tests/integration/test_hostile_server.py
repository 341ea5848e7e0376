"""What a hostile client can send before a request reaches the app, against the real service
process (granian in front of it): oversized and trickled heads, trickled bodies, and bodies
that would hold chat slots. Each gets a clear answer or a closed connection, never a
traceback, and honest clients are still served."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes.upstream import MODEL, Recorder, ServerThread, build_upstream
from tests.helpers import free_port
from tests.service import ServiceProcess

HI = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerThread]:
    with ServerThread(build_upstream(Recorder()), free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def service(upstream, tmp_path_factory) -> Iterator[ServiceProcess]:
    port = int(upstream.url.rsplit(":", 1)[1])
    config = {
        "web": {
            "bind_address": {"host": "127.0.0.1", "port": free_port()},
            "header_timeout": 1,
            "body_timeout": 1,
            "max_concurrent_requests": 4,
        },
        "vllm": {"auto_start": False, "host": "127.0.0.1", "port": port, "model_name": MODEL},
    }
    service = ServiceProcess(config, tmp_path_factory.mktemp("hostile"))
    try:
        service.wait_healthy(timeout=30)
        yield service
    finally:
        service.kill_all()
        assert "Traceback" not in service.log(), service.log()[-3000:]


def _connect(service: ServiceProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_a_head_over_64_kib_is_refused_with_431(service):
    sock = _connect(service)
    big = b"x" * (70 * 1024)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + big + b"\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        return  # the connection closed: also a refusal
    answer = _read_all(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:100]
    # A head just under the limit is served.
    r = httpx.get(service.url + "/health", headers={"X-Big": "x" * (60 * 1024)})
    assert r.status_code == 200


def test_a_head_not_finished_in_time_is_disconnected(service):
    sock = _connect(service)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
    started = time.monotonic()
    answer = _read_all(sock)  # returns when the server closes (the socket's timeout is 10 s)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 5, "the connection was held past web.header_timeout"


def test_a_body_not_finished_in_time_is_a_408(service):
    sock = _connect(service)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"messages": '
    )
    started = time.monotonic()
    answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"web.body_timeout" in answer
    assert time.monotonic() - started < 5


def test_slow_bodies_take_no_chat_slot_from_an_honest_client(service):
    """8 clients trickling their bodies, 4 chat slots: an honest request is still served."""
    socks = []
    for _ in range(8):
        sock = _connect(service)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
            b"\r\nContent-Length: 1000\r\n\r\n{"
        )
        socks.append(sock)
    try:
        time.sleep(0.3)
        r = httpx.post(service.url + "/v1/chat/completions", json=HI, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        for sock in socks:
            sock.close()


def test_a_request_id_with_a_line_break_is_a_400_naming_it(service, upstream):
    r = httpx.post(service.url + "/v1/chat/completions", json=HI, headers={"X-Request-Id": "abc"})
    assert r.headers["x-request-id"] == "abc"
    sock = _connect(service)
    body = b'{"prompt": "hi", "request_id": "abc\\n"}'
    sock.sendall(
        b"POST /chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b'"error":"request_id: ' in answer
    assert b"x-request-id: abc\r" not in answer.lower()


def test_the_service_still_serves_after_all_this(service):
    threads = [
        threading.Thread(
            target=lambda: httpx.post(service.url + "/v1/chat/completions", json=HI, timeout=10)
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert httpx.get(service.url + "/health").status_code == 200
