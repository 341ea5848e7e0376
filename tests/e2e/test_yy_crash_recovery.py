"""Runs after the other end-to-end tests, before the shutdown test: vLLM's API server is killed
with SIGKILL during traffic; requests get 503 at once (never hang), the supervisor cleans up
what is left of the group and restarts vLLM, and the same question is answered again."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.helpers import alive, descendants
from tests.helpers import command_line as cmdline
from tide_vllm.infrastructure.vllm.supervisor import VLLM_SERVER_MODULE

pytestmark = pytest.mark.e2e

QUESTION = {"prompt": "What is the capital of France?", "temperature": 0, "max_tokens": 16}


def test_kill_9_of_the_vllm_api_server_is_survived(real_service):
    before = descendants(real_service.proc.pid)
    api_servers = [
        p for p in before if VLLM_SERVER_MODULE in cmdline(p) and "vllm_launcher" not in cmdline(p)
    ]
    assert len(api_servers) == 1, [cmdline(p) for p in before]

    statuses: list[tuple[int, float]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(
            base_url=real_service.url, headers=real_service.http.headers, timeout=30
        ) as client:
            while not stop.is_set():
                started = time.monotonic()
                code = client.post("/chat/completions", json=QUESTION).status_code
                statuses.append((code, time.monotonic() - started))
                time.sleep(0.05)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(1)
        os.kill(api_servers[0], signal.SIGKILL)
        killed = time.monotonic()
        while httpx.get(real_service.url + "/health").status_code == 200:
            assert time.monotonic() - killed < 2, "/health did not notice the death of vLLM"
            time.sleep(0.05)
        health = httpx.get(real_service.url + "/health").json()
        assert health["vllm_healthy"] is False and health["vllm_state"] in (
            "restarting",
            "starting",
        )
        real_service.wait_healthy(timeout=300)
    finally:
        stop.set()
        thread.join(60)

    codes = {code for code, _ in statuses}
    assert codes <= {200, 503}, statuses
    assert 503 in codes, "no request saw vLLM down"
    assert max(took for code, took in statuses if code == 503) < 5, "a 503 was slow to come"
    left = [p for p in before if alive(p)]
    assert left == [], f"orphans of the dead vLLM: {left}"

    r = real_service.http.post("/chat/completions", json=QUESTION, timeout=60)
    assert r.status_code == 200 and r.json()["content"].strip() and r.json()["error"] is None
