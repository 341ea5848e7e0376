"""Manual mode with the real service process: it starts while vLLM is down, says so, and
serves as soon as a vLLM server answers, without a restart."""

import subprocess

import httpx

from tests.helpers import FAKE_VLLM, PYTHON, alive, free_port
from tests.service import ServiceProcess, fake_vllm_config


def test_manual_mode_serves_as_soon_as_vllm_answers(tmp_path):
    vllm_port, web_port = free_port(), free_port()
    config = {
        "web": {"bind_address": {"host": "127.0.0.1", "port": web_port}},
        "vllm": {
            "auto_start": False,
            "host": "127.0.0.1",
            "port": vllm_port,
            "model_name": "fake-model",
            "timeout": 5,
        },
    }
    service = ServiceProcess(config, tmp_path)
    fake = None
    try:
        service.wait_listening()
        health = httpx.get(service.url + "/health")
        assert health.status_code == 503
        assert health.json()["vllm_healthy"] is False
        assert "unreachable" in health.json()["status"]
        chat = httpx.post(service.url + "/chat/completions", json={"prompt": "hi"})
        assert chat.status_code == 503 and chat.json()["error"]

        fake = subprocess.Popen(
            [PYTHON, str(FAKE_VLLM), "--port", str(vllm_port), "--served-model-name", "fake-model"]
        )
        service.wait_healthy(timeout=20)
        chat = httpx.post(service.url + "/chat/completions", json={"prompt": "hi"})
        assert chat.status_code == 200
        assert chat.json()["content"] == "fake answer to: hi"
        assert chat.json()["usage"]["total_tokens"] == 12

        code, left = service.terminate()
        assert code == 0
        assert fake.poll() is None, "manual mode must not stop a vLLM it did not start"
    finally:
        service.kill_all()
        if fake:
            fake.kill()
            fake.wait()


def test_auto_start_mode_on_the_fake_vllm_exits_0_on_sigterm_leaving_nothing(tmp_path):
    config = fake_vllm_config("delay=1,grandchild")
    service = ServiceProcess(config, tmp_path)
    try:
        service.wait_listening()
        service.wait_healthy(timeout=30)
        r = httpx.post(service.url + "/v1/chat/completions", json={"prompt": "hello"})
        assert r.status_code == 200 and r.json()["content"] == "fake answer to: hello"
        code, left = service.terminate()
        assert code == 0, service.log()[-3000:]
        assert left == [], f"processes left after SIGTERM: {left}"
        assert "fake vLLM ready" in service.log()  # vLLM's output is relayed to the log
    finally:
        service.kill_all()


def test_auto_start_exits_non_zero_when_vllm_never_gets_ready(tmp_path):
    config = fake_vllm_config(
        "never_ready,grandchild",
        startup_timeout=2,
        env={"FAKE_VLLM_PIDFILE": str(tmp_path / "pids")},
    )
    service = ServiceProcess(config, tmp_path)
    try:
        code = service.proc.wait(timeout=60)
        assert code == 1
        log = service.log()
        assert "vLLM was not ready within vllm.startup_timeout=2s" in log
        assert "Traceback" not in log
        pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        assert len(pids) == 2 and not any(alive(p) for p in pids), "the vLLM group was left"
    finally:
        service.kill_all()
