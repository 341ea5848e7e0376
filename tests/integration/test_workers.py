"""Several web workers on one port, with exactly one vLLM supervisor."""

from __future__ import annotations

import time

import httpx

from tests.fakes.upstream import MODEL, Recorder, ServerThread, build_upstream
from tests.helpers import command_line, descendants, free_port
from tests.service import ServiceProcess, fake_fleet_config, fake_vllm_config


def test_two_workers_one_vllm_started_once_and_stopped_cleanly(tmp_path):
    config = fake_vllm_config("delay=1", web={"workers": 2})
    service = ServiceProcess(config, tmp_path)
    try:
        service.wait_listening()
        service.wait_healthy(timeout=30)
        tree = descendants(service.proc.pid)
        fakes = [
            p
            for p in tree
            if "fake_vllm.py" in command_line(p) and "vllm_launcher" not in command_line(p)
        ]
        assert len(fakes) == 1, "vLLM must be started once, not once per worker"
        workers = [
            p
            for p in tree
            if "multiprocessing" in command_line(p) and "resource_tracker" not in command_line(p)
        ]
        assert len(workers) == 2, [command_line(p) for p in tree]
        with httpx.Client(base_url=service.url) as client:
            for _ in range(20):  # across both workers
                r = client.post(
                    "/chat/completions", json={"prompt": "hi"}, headers={"Connection": "close"}
                )
                assert r.status_code == 200 and r.json()["content"] == "fake answer to: hi"
            text = client.get("/metrics").text
        assert "tide_vllm_vllm_up 1.0" in text
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("tide_vllm_requests_total{") and 'route="/chat/completions"' in line
        )
        assert total == 20, "the metrics of both workers are summed"
        code, left = service.terminate()
        assert code == 0, service.log()[-2000:]
        assert left == []
    finally:
        service.kill_all()


def test_workers_in_manual_mode(tmp_path):
    with ServerThread(build_upstream(Recorder()), free_port()) as upstream:
        port = int(upstream.url.rsplit(":", 1)[1])
        config = {
            "web": {"bind_address": {"host": "127.0.0.1", "port": free_port()}, "workers": 2},
            "vllm": {"auto_start": False, "host": "127.0.0.1", "port": port, "model_name": MODEL},
        }
        service = ServiceProcess(config, tmp_path)
        try:
            service.wait_healthy(timeout=30)
            r = httpx.post(
                service.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200
            assert service.terminate()[0] == 0
        finally:
            service.kill_all()


def test_a_drain_asked_of_one_worker_holds_in_every_worker(tmp_path):
    """Two workers, two engines: engine a is drained through one request (one worker); then
    requests on new connections, which the kernel spreads over both workers, all go to b."""
    config = fake_fleet_config({"a": "", "b": ""}, web={"workers": 2})
    config["routing"] = {"policy": "round_robin"}
    service = ServiceProcess(config, tmp_path)
    try:
        service.wait_healthy(timeout=60)
        assert httpx.post(service.url + "/admin/engines/a/drain", timeout=10).status_code == 200
        time.sleep(0.5)  # the engines' lines reach the log through the supervisor's reader
        before = chats_on(service, "a"), chats_on(service, "b")
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(20):  # a new connection each: both workers take some
            r = httpx.post(service.url + "/v1/chat/completions", json=body, timeout=10)
            assert r.status_code == 200, r.text
        time.sleep(1)
        after = chats_on(service, "a"), chats_on(service, "b")
        assert after[0] == before[0], service.log()[-3000:]
        assert after[1] - before[1] == 20
    finally:
        service.terminate()


def chats_on(service: ServiceProcess, engine: str) -> int:
    """The chat requests engine `engine`'s fake vLLM logged (its access lines, in the log)."""
    return sum(
        1
        for line in service.log().splitlines()
        if f" vllm.{engine} " in line and "POST /v1/chat/completions" in line
    )
