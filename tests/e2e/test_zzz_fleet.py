"""Runs after the shared service has stopped (test_zz_shutdown.py): tide-vllm starts a fleet of
two real CPU vLLM replicas of the demo model from `engines:`, in routing's precise mode (each
replica publishes its KV-cache events, each request's token ids are asked of a replica), routes
a multi-turn conversation to the replica that holds its prefix, as that replica's own events
say, and keeps answering from the other replica when that one is killed. Nothing here depends
on the model's words."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.helpers import ROOT, alive, descendants, free_port
from tests.helpers import command_line as cmdline
from tests.service import ServiceProcess
from tide_vllm.infrastructure.vllm.supervisor import VLLM_SERVER_MODULE

from .conftest import API_KEY, STARTUP_WAIT

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    config = yaml.safe_load((ROOT / "conf" / "tide-vllm.cpu.yaml").read_text())
    config["web"]["bind_address"] = {"host": "127.0.0.1", "port": free_port()}
    config["auth"] = {"api_keys": [API_KEY]}
    if os.environ.get("TIDE_VLLM_MODEL_DIR"):
        config["vllm"]["model_path"] = os.environ["TIDE_VLLM_MODEL_DIR"]
    model = Path(os.path.expanduser(config["vllm"]["model_path"]))
    assert (model / "config.json").exists(), f"demo model missing at {model}: run `make model`"
    config["vllm"]["env"]["VLLM_CPU_KVCACHE_SPACE"] = "1"
    # Responses are kept, each in the memory of the engine that made it.
    config["vllm"]["env"]["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    config["engines"] = [
        {"name": name, "port": free_port(), "env": {"VLLM_CPU_OMP_THREADS_BIND": str(core)}}
        for core, name in enumerate(("left", "right"))
    ]
    config["routing"] = {"policy": "prefix", "kv_events": True}
    service = ServiceProcess(config, tmp_path_factory.mktemp("fleet"))
    try:
        service.wait_listening()
        service.wait_healthy(timeout=STARTUP_WAIT)
        deadline = time.monotonic() + STARTUP_WAIT
        while not all(e["state"] == "ready" for e in engines(service)):
            assert time.monotonic() < deadline, engines(service)
            time.sleep(1)
        yield service
    finally:
        service.kill_all()


def engines(service: ServiceProcess) -> list[dict]:
    r = httpx.get(service.url + "/admin/engines", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["engines"]


def api_server_of(service: ServiceProcess, port: int) -> int:
    """The pid of the vLLM API server listening on `port`."""
    for pid in descendants(service.proc.pid):
        line = cmdline(pid)
        if VLLM_SERVER_MODULE in line and "vllm_launcher" not in line and f"{port}" in line:
            return pid
    raise AssertionError(f"no vLLM API server on port {port}")


def test_a_conversation_is_answered_and_survives_the_death_of_its_replica(fleet):
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0)
    model = fleet.config["vllm"]["model_name"]
    system = "You are a patient tutor who answers in one short sentence. " * 12
    messages = [{"role": "system", "content": system}]

    def turn(question: str) -> str:
        messages.append({"role": "user", "content": question})
        answer = client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0
        )
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 8
        content = answer.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": content})
        return content

    for question in ("What is a tide?", "Why are there two a day?", "And spring tides?"):
        turn(question)
    dispatched = {e["name"]: e["dispatched"] for e in engines(fleet)}
    home = max(dispatched, key=lambda name: dispatched[name])
    assert dispatched[home] == 3, f"the conversation's turns were spread: {dispatched}"
    # Each turn's access line names the replica that answered it.
    turns = [x for x in fleet.log().splitlines() if "POST /v1/chat/completions 200" in x]
    assert len(turns) == 3 and all(f" engine={home} routing=" in x for x in turns), turns
    # The replica's own events say it holds the conversation's blocks; the other holds none.
    deadline = time.monotonic() + 10
    while not (listing := {e["name"]: e for e in engines(fleet)})[home]["cached_blocks"]:
        assert time.monotonic() < deadline, listing
        time.sleep(0.2)
    assert listing[home]["kv_event_batches"] > 0
    other = next(name for name in listing if name != home)
    assert listing[other]["cached_blocks"] == 0, listing

    # A stored response is retrieved, and continued from, whichever replica made it.
    made = client.responses.create(model=model, input="What is a tide?", max_output_tokens=8)
    for _ in range(3):
        assert client.responses.retrieve(made.id).id == made.id
    follow = client.responses.create(
        model=model, input="Say more.", previous_response_id=made.id, max_output_tokens=8
    )
    assert follow.previous_response_id == made.id
    assert client.responses.retrieve(follow.id).id == follow.id

    port = next(e["port"] for e in fleet.config["engines"] if e["name"] == home)
    victim = api_server_of(fleet, port)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    answered = 0
    while time.monotonic() - killed < 8:  # the replica is gone, then restarting
        turn("Tell me one more thing about tides.")
        answered += 1
        messages[:] = messages[:1] + messages[-2:]  # keep the prompt short
    assert answered >= 2
    assert not alive(victim)
    r = httpx.get(fleet.url + "/health", timeout=10)
    assert r.status_code == 200, r.text  # the model still has a ready engine
    states = {e["name"]: e["state"] for e in r.json()["engines"]}
    assert states[home] in ("restarting", "starting", "ready") and states[home] != "failed"
    assert states[other] == "ready"
