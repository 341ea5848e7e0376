"""The fleet behind the one endpoint, in process: the real app with several fake engines (one
httpx.MockTransport answering for every engine's host), each with a monitor the test sets.
What a user of the fleet notices: where requests go (spread, conversation affinity, spill
under load, sticky sessions, models), what happens when an engine fails (one retry elsewhere
before the first byte, none after), what operators see and do (/health, /admin/engines,
drain and resume, metrics per engine)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tide_vllm.domain.chat.entity import EngineState, EngineStatus
from tide_vllm.domain.chat.factory import ChatDefaults
from tide_vllm.provider.provider import EngineSettings, ProviderSettings
from tide_vllm_cmd.app.options.plugin_web_handler import build_app

from .conftest import READY, SettableMonitor, serving

MODEL = "Qwen2.5-7B-Instruct"
OTHER = "Llama-3-8B"
KEY = "fleet-key"
STARTING = EngineStatus(EngineState.STARTING, False, "vLLM is starting (3s)")

Behaviour = Callable[[httpx.Request], Awaitable[httpx.Response | None]]


def completion(model: str, engine: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{engine}",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": engine},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21},
    }


def events(model: str, words: list[str]) -> list[bytes]:
    chunks = [{"choices": [{"index": 0, "delta": {"content": w}}], "model": model} for w in words]
    last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "model": model}
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(words)}}
    lines = [f"data: {json.dumps(c)}\n\n".encode() for c in [*chunks, last, usage]]
    return [*lines, b"data: [DONE]\n\n"]


async def stream_of(parts: list[bytes], fail_after: int | None = None) -> AsyncIterator[bytes]:
    for i, part in enumerate(parts):
        if fail_after is not None and i == fail_after:
            raise httpx.ReadError("connection reset by peer")
        yield part
        await asyncio.sleep(0)


@dataclass
class FakeEngine:
    """One engine: answers like vLLM, records what it got, and can be told to misbehave."""

    name: str
    model: str
    received: list[dict[str, Any]] = field(default_factory=list)
    behaviour: Behaviour | None = None
    monitor: SettableMonitor = field(default_factory=SettableMonitor)
    adapters: list[str] = field(default_factory=list)  # LoRA adapters it serves, by name
    metrics: str = (
        "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0.0\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0.1\n"
    )

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            listed = [{"id": self.model, "parent": None}]
            listed += [{"id": name, "parent": self.model} for name in self.adapters]
            return httpx.Response(200, json={"object": "list", "data": listed})
        if path == "/metrics":
            return httpx.Response(200, text=self.metrics)
        body = json.loads(request.content) if request.content else {}
        self.received.append(body)
        if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            return self.lora(path, body["lora_name"])
        if self.behaviour is not None:
            answer = await self.behaviour(request)
            if answer is not None:
                return answer
        if body.get("stream"):
            return httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                content=stream_of(events(self.model, ["from", self.name])),
            )
        if path == "/v1/completions":
            return httpx.Response(200, json={"object": "text_completion", "engine": self.name})
        return httpx.Response(200, json=completion(self.model, self.name))

    def lora(self, path: str, name: str) -> httpx.Response:
        """vLLM's runtime loading and unloading of an adapter (its answers are plain text)."""
        loading = path == "/v1/load_lora_adapter"
        if loading == (name in self.adapters):
            problem = "has already been loaded" if loading else "cannot be found"
            error = {"message": f"The lora adapter '{name}' {problem}.", "code": 400}
            return httpx.Response(400, json={"error": error})
        if loading:
            self.adapters.append(name)
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        self.adapters.remove(name)
        return httpx.Response(200, text=f"Success: LoRA adapter '{name}' removed successfully.")


class Fleet:
    def __init__(self, engines: list[FakeEngine], http: httpx.AsyncClient, app: Any) -> None:
        self.engines = {e.name: e for e in engines}
        self.http = http
        self.app = app

    def __getitem__(self, name: str) -> FakeEngine:
        return self.engines[name]

    def counts(self) -> dict[str, int]:
        return {name: len(e.received) for name, e in self.engines.items()}

    async def chat(self, messages: list[dict[str, str]], **extra: Any) -> httpx.Response:
        headers = extra.pop("headers", {})
        body = {"model": MODEL, "messages": messages, **extra}
        return await self.http.post("/v1/chat/completions", json=body, headers=headers)

    async def metric(self, name: str, **labels: str) -> float:
        text = (await self.http.get("/metrics")).text
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(f"{name}{{{wanted}}}" if labels else f"{name} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def fleet_app(engines: list[FakeEngine], policy: str = "prefix", **options: Any) -> Any:
    by_host = {f"{e.name}.test": e for e in engines}

    async def route(request: httpx.Request) -> httpx.Response:
        engine = by_host[request.url.host]
        if engine.behaviour is refuse:
            raise httpx.ConnectError("connection refused", request=request)
        return await engine.handle(request)

    settings = ProviderSettings(
        base_url="http://unused.test",
        timeout=5,
        defaults=ChatDefaults(MODEL, "", 64, 0.7, 0.9),
        engines=tuple(
            EngineSettings(e.name, e.model, f"http://{e.name}.test:8000") for e in engines
        ),
        policy=policy,
    )
    monitors = {e.name: e.monitor for e in engines}
    return build_app(settings, transport=httpx.MockTransport(route), monitors=monitors, **options)


async def refuse(request: httpx.Request) -> httpx.Response | None:
    raise AssertionError("never called: the transport refuses the connection")


async def unavailable(request: httpx.Request) -> httpx.Response | None:
    return httpx.Response(
        503, json={"error": {"message": "sleeping", "type": "ServiceUnavailableError"}}
    )


@pytest.fixture
async def make_fleet() -> AsyncIterator[Callable[..., Awaitable[Fleet]]]:
    async with contextlib.AsyncExitStack() as opened:

        async def make(engines: list[FakeEngine], policy: str = "prefix", **options: Any) -> Fleet:
            app = fleet_app(engines, policy, **options)
            http = await opened.enter_async_context(serving(app, timeout=10))
            return Fleet(engines, http, app)

        yield make


def two(model: str = MODEL) -> list[FakeEngine]:
    return [FakeEngine("r0", model), FakeEngine("r1", model)]


def conversation(topic: str, turns: int) -> list[dict[str, str]]:
    system = {"role": "system", "content": f"You are the expert on {topic}. " * 40}
    messages = [system]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn} about {topic}?"})
        messages.append({"role": "assistant", "content": f"Answer {turn} about {topic}."})
    return messages


# -- where requests go ----------------------------------------------------------------------


async def test_unrelated_requests_are_spread_over_the_engines(make_fleet):
    fleet = await make_fleet(two())
    for i in range(8):
        r = await fleet.chat([{"role": "user", "content": f"unrelated question number {i} " * 20}])
        assert r.status_code == 200
    assert fleet.counts() == {"r0": 4, "r1": 4}


async def test_each_conversation_stays_on_the_engine_that_holds_its_prefix(make_fleet):
    fleet = await make_fleet(two())
    served: dict[str, set[str]] = {"tides": set(), "volcanoes": set(), "jazz": set()}
    for turn in range(1, 5):
        for topic in served:
            r = await fleet.chat(conversation(topic, turn))
            assert r.status_code == 200
            served[topic].add(r.json()["choices"][0]["message"]["content"])
    assert all(len(engines) == 1 for engines in served.values()), served
    assert {e for engines in served.values() for e in engines} == {"r0", "r1"}
    assert (
        await fleet.metric("tide_vllm_routing_decisions_total", engine="r0", reason="affinity")
        + (await fleet.metric("tide_vllm_routing_decisions_total", engine="r1", reason="affinity"))
        >= 9
    )


async def test_a_conversation_spills_to_another_engine_when_its_own_is_overloaded(make_fleet):
    gate = asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response | None:
        await gate.wait()
        return None

    fleet = await make_fleet(two())
    first = await fleet.chat(conversation("tides", 1))
    home = first.json()["choices"][0]["message"]["content"]
    away = "r1" if home == "r0" else "r0"
    fleet[home].behaviour = held
    # The conversation's turns pile up on the engine that holds its prefix until it is
    # clearly overloaded (more than 8 requests above the other, and 1.5 times as many).
    blockers = [asyncio.create_task(fleet.chat(conversation("tides", 1))) for _ in range(12)]
    await asyncio.sleep(0.3)
    held_at_home = fleet.counts()[home] - 1
    try:
        r = await asyncio.wait_for(fleet.chat(conversation("tides", 2)), 5)
    finally:
        gate.set()
        await asyncio.gather(*blockers)
    assert held_at_home == 9
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == away
    assert await fleet.metric("tide_vllm_routing_decisions_total", engine=away, reason="load") >= 1


async def test_a_session_id_keeps_unrelated_requests_on_one_engine(make_fleet):
    fleet = await make_fleet(two())
    seen = set()
    for i in range(6):
        r = await fleet.chat(
            [{"role": "user", "content": f"different each time {i} " * 20}],
            headers={"X-Session-Id": "user-42"},
        )
        seen.add(r.json()["choices"][0]["message"]["content"])
    assert len(seen) == 1


async def test_round_robin_alternates(make_fleet):
    fleet = await make_fleet(two(), policy="round_robin")
    for _ in range(6):
        await fleet.chat(conversation("tides", 1))
    assert fleet.counts() == {"r0": 3, "r1": 3}


async def test_requests_go_to_the_engines_of_their_model(make_fleet):
    fleet = await make_fleet([FakeEngine("r0", MODEL), FakeEngine("big", OTHER)])
    r = await fleet.http.post(
        "/v1/chat/completions",
        json={"model": OTHER, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.json()["choices"][0]["message"]["content"] == "big"
    # No model, and the spec's own (Tide) requests: the default model, vllm.model_name.
    r = await fleet.http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.json()["choices"][0]["message"]["content"] == "r0"
    r = await fleet.http.post("/chat/completions", json={"prompt": "hi"})
    assert r.status_code == 200 and r.json()["content"] == "r0"
    # A relayed route is routed by its body's model too.
    r = await fleet.http.post("/v1/completions", json={"model": OTHER, "prompt": "hi"})
    assert r.json()["engine"] == "big"
    assert [b.get("model") for b in fleet["big"].received] == [OTHER, OTHER]


async def test_an_unknown_model_gets_vllms_404(make_fleet):
    fleet = await make_fleet([FakeEngine("r0", MODEL), FakeEngine("big", OTHER)])
    for path, body in [
        (
            "/v1/chat/completions",
            {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
        ),
        ("/v1/completions", {"model": "gpt-9", "prompt": "x"}),
    ]:
        r = await fleet.http.post(path, json=body)
        assert r.status_code == 404
        assert r.json() == {
            "error": {
                "message": "The model `gpt-9` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
    assert fleet.counts() == {"r0": 0, "big": 0}


async def test_a_lora_adapter_goes_to_the_engines_that_list_it(make_fleet):
    adapted = FakeEngine("big", OTHER, adapters=["sql-lora"])  # loaded on one engine only
    fleet = await make_fleet(
        [FakeEngine("r0", MODEL), adapted, FakeEngine("big2", OTHER)], policy="round_robin"
    )
    r = await fleet.http.get("/v1/models")  # the adapters are read from it too (and every 10 s)
    assert [m["id"] for m in r.json()["data"]] == [MODEL, OTHER, "sql-lora"]
    for _ in range(2):
        chat = {"model": "sql-lora", "messages": [{"role": "user", "content": "x"}]}
        assert (await fleet.http.post("/v1/chat/completions", json=chat)).status_code == 200
        text = {"model": "sql-lora", "prompt": "x"}
        assert (await fleet.http.post("/v1/completions", json=text)).status_code == 200
    assert fleet.counts() == {"r0": 0, "big": 4, "big2": 0}
    for _ in range(2):  # the base model is served by both
        chat = {"model": OTHER, "messages": [{"role": "user", "content": "x"}]}
        assert (await fleet.http.post("/v1/chat/completions", json=chat)).status_code == 200
    assert fleet.counts() == {"r0": 0, "big": 5, "big2": 1}
    r = await fleet.http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404


async def test_an_adapter_on_one_replica_of_a_single_model_fleet_is_served_there(make_fleet):
    fleet = await make_fleet(
        [FakeEngine("r0", MODEL), FakeEngine("r1", MODEL, adapters=["sql-lora"])],
        policy="round_robin",
    )
    await fleet.http.get("/v1/models")
    for _ in range(4):
        chat = {"model": "sql-lora", "messages": [{"role": "user", "content": "x"}]}
        assert (await fleet.http.post("/v1/chat/completions", json=chat)).status_code == 200
    assert fleet.counts() == {"r0": 0, "r1": 4}


async def test_an_adapter_loaded_at_run_time_is_loaded_on_every_engine_of_its_model(
    make_fleet,
):
    fleet = await make_fleet(
        [FakeEngine("r0", MODEL), FakeEngine("r1", MODEL), FakeEngine("big", OTHER)],
        policy="round_robin",
    )
    load = {"lora_name": "sql", "lora_path": "/adapters/sql"}
    r = await fleet.http.post("/v1/load_lora_adapter", json=load)
    assert r.status_code == 200 and r.text.startswith("Success: LoRA adapter 'sql' added")
    assert (fleet["r0"].adapters, fleet["r1"].adapters, fleet["big"].adapters) == (
        ["sql"], ["sql"], []
    )  # fmt: skip
    # At once, without waiting for the next read of the engines' lists: both serve it.
    chat = {"model": "sql", "messages": [{"role": "user", "content": "x"}]}
    for _ in range(4):
        assert (await fleet.http.post("/v1/chat/completions", json=chat)).status_code == 200
    named = {e: [b.get("model") for b in fleet[e].received].count("sql") for e in ("r0", "r1")}
    assert named == {"r0": 2, "r1": 2}
    # Loaded again, where one engine has it already: that engine's refusal is the answer.
    fleet["r1"].adapters.remove("sql")
    r = await fleet.http.post("/v1/load_lora_adapter", json=load)
    assert r.status_code == 400 and "already been loaded" in r.text
    assert fleet["r1"].adapters == ["sql"]
    r = await fleet.http.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert r.status_code == 200
    assert fleet["r0"].adapters == fleet["r1"].adapters == []
    # `model` names the model whose engines load it.
    r = await fleet.http.post("/v1/load_lora_adapter", json={**load, "model": OTHER})
    assert r.status_code == 200
    assert (fleet["r0"].adapters, fleet["big"].adapters) == ([], ["sql"])
    assert await fleet.metric("tide_vllm_routing_decisions_total", engine="big", reason="every")


async def test_an_engine_that_comes_back_is_given_the_adapters_loaded_at_run_time(make_fleet):
    fleet = await make_fleet([FakeEngine("r0", MODEL), FakeEngine("r1", MODEL)])
    load = {"lora_name": "sql", "lora_path": "/adapters/sql"}
    assert (await fleet.http.post("/v1/load_lora_adapter", json=load)).status_code == 200
    dropped = {"lora_name": "old", "lora_path": "/adapters/old"}
    assert (await fleet.http.post("/v1/load_lora_adapter", json=dropped)).status_code == 200
    r = await fleet.http.post("/v1/unload_lora_adapter", json={"lora_name": "old"})
    assert r.status_code == 200
    # r1 restarts: out of rotation, then back with none of them.
    fleet["r1"].monitor.status = STARTING
    await fleet.http.get("/admin/engines")  # the fleet sees it go
    fleet["r1"].adapters.clear()
    fleet["r1"].monitor.status = READY
    await fleet.http.get("/admin/engines")  # and come back
    for _ in range(100):
        if fleet["r1"].adapters:
            break
        await asyncio.sleep(0.01)
    assert fleet["r1"].adapters == ["sql"]  # loaded again; the unloaded one not
    assert fleet["r0"].adapters == ["sql"]
    # r0 is out of rotation for a while, without restarting: nothing is loaded twice.
    loads = len(fleet["r0"].received)
    fleet["r0"].monitor.status = STARTING
    await fleet.http.get("/admin/engines")
    fleet["r0"].monitor.status = READY
    await fleet.http.get("/admin/engines")
    await asyncio.sleep(0.05)
    assert len(fleet["r0"].received) == loads and fleet["r0"].adapters == ["sql"]


async def test_models_lists_each_served_model_once(make_fleet):
    engines = [FakeEngine("a", MODEL), FakeEngine("b", MODEL), FakeEngine("c", OTHER)]
    fleet = await make_fleet(engines)
    r = await fleet.http.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL, OTHER]
    assert r.json()["object"] == "list"


# -- failures -------------------------------------------------------------------------------


async def lost(request: httpx.Request) -> httpx.Response | None:
    raise httpx.ReadError("connection reset by peer", request=request)


@pytest.mark.parametrize(
    "failure", [refuse, unavailable, lost], ids=["connect refused", "503", "connection lost"]
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_engine_that_refuses_a_request_is_replaced_once(make_fleet, failure, stream):
    fleet = await make_fleet(two(), policy="round_robin")
    fleet["r0"].behaviour = failure
    for _ in range(4):
        r = await fleet.chat([{"role": "user", "content": "hi"}], stream=stream)
        assert r.status_code == 200
        assert "r1" in r.text
    assert fleet.counts()["r1"] == 4
    assert await fleet.metric("tide_vllm_engine_retries_total", engine="r0") >= 2


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_the_access_line_names_the_engine_that_answered_and_the_one_tried(
    make_fleet, caplog, stream
):
    fleet = await make_fleet(two(), policy="round_robin")
    fleet["r0"].behaviour = refuse
    caplog.set_level(logging.INFO, logger="tide_vllm.access")
    for _ in range(2):  # one of the two starts on r0, whichever turn the rotation is at
        r = await fleet.chat([{"role": "user", "content": "hi"}], stream=stream)
        assert r.status_code == 200
    r = await fleet.http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 200
    lines = [x for x in caplog.records if x.name == "tide_vllm.access"]
    chats = [x for x in lines if x.path == "/v1/chat/completions"]
    assert {(x.engine, x.routing) for x in chats} == {("r1", "round_robin")}
    assert ["r0"] in [x.tried for x in chats]
    assert any(x.getMessage().endswith("engine=r1 routing=round_robin tried=r0") for x in chats)
    relayed = [x for x in lines if x.path == "/v1/completions"]
    assert [x.engine for x in relayed] == ["r1"]  # the relay names its engine too


async def test_a_stream_lost_before_its_first_event_is_replaced_once(make_fleet):
    async def lost(request: httpx.Request) -> httpx.Response:
        parts = events(MODEL, ["never"])
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=stream_of(parts, fail_after=0))  # fmt: skip

    fleet = await make_fleet(two(), policy="round_robin")
    fleet["r0"].behaviour = lost
    r = await fleet.chat([{"role": "user", "content": "hi"}], stream=True)
    assert r.status_code == 200
    assert '"from"' in r.text and "r1" in r.text and "error" not in r.text
    assert fleet.counts() == {"r0": 1, "r1": 1}


async def test_a_stream_that_has_started_is_never_retried(make_fleet):
    async def breaks(request: httpx.Request) -> httpx.Response:
        parts = events(MODEL, ["one", "two", "three"])
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=stream_of(parts, fail_after=2))  # fmt: skip

    fleet = await make_fleet(two(), policy="round_robin")
    fleet["r0"].behaviour = breaks
    r = await fleet.chat([{"role": "user", "content": "hi"}], stream=True)
    assert r.status_code == 200
    assert '"one"' in r.text and '"error"' in r.text and r.text.endswith("data: [DONE]\n\n")
    assert fleet.counts() == {"r0": 1, "r1": 0}
    assert await fleet.metric("tide_vllm_engine_errors_total", engine="r0") == 1


async def test_a_request_vllm_may_have_run_is_not_sent_twice(make_fleet):
    async def fails(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "engine crashed"}})

    fleet = await make_fleet(two(), policy="round_robin")
    fleet["r0"].behaviour = fails
    r = await fleet.chat([{"role": "user", "content": "hi"}])
    assert r.status_code == 500
    assert fleet.counts() == {"r0": 1, "r1": 0}


async def test_an_engine_failing_its_health_checks_takes_no_requests_until_it_passes(make_fleet):
    fleet = await make_fleet(two())
    fleet["r0"].monitor.status = STARTING
    for i in range(4):
        r = await fleet.chat([{"role": "user", "content": f"q{i}"}])
        assert r.status_code == 200
    assert fleet.counts() == {"r0": 0, "r1": 4}
    fleet["r0"].monitor.status = READY
    for i in range(4):
        await fleet.chat([{"role": "user", "content": f"other question {i} " * 10}])
    assert fleet.counts()["r0"] > 0


async def test_health_is_200_while_every_model_has_a_ready_engine(make_fleet):
    engines = [FakeEngine("a", MODEL), FakeEngine("b", MODEL), FakeEngine("c", OTHER)]
    fleet = await make_fleet(engines)
    fleet["a"].monitor.status = STARTING
    r = await fleet.http.get("/health")
    assert r.status_code == 200
    assert r.json()["vllm_healthy"] is True
    states = {e["name"]: e["state"] for e in r.json()["engines"]}
    assert states == {"a": "starting", "b": "ready", "c": "ready"}
    fleet["c"].monitor.status = STARTING
    r = await fleet.http.get("/health")
    assert r.status_code == 503
    assert OTHER in r.json()["status"]
    assert (await fleet.http.get("/ready")).status_code == 503


async def test_with_no_engine_ready_the_request_gets_503_naming_each(make_fleet):
    fleet = await make_fleet(two())
    fleet["r0"].monitor.status = fleet["r1"].monitor.status = STARTING
    r = await fleet.chat([{"role": "user", "content": "hi"}])
    assert r.status_code == 503
    assert "r0: vLLM is starting" in r.json()["error"]["message"]
    assert fleet.counts() == {"r0": 0, "r1": 0}


# -- operators ------------------------------------------------------------------------------


async def test_a_drained_engine_finishes_its_requests_and_takes_no_new_ones(make_fleet):
    gate = asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response | None:
        await gate.wait()
        return None

    fleet = await make_fleet(two(), policy="round_robin", api_keys=[KEY])
    auth = {"Authorization": f"Bearer {KEY}"}
    fleet["r0"].behaviour = held
    in_flight = asyncio.create_task(
        fleet.http.post("/v1/chat/completions", headers=auth,
                        json={"messages": [{"role": "user", "content": "long"}]})
    )  # fmt: skip
    await asyncio.sleep(0.2)
    assert fleet.counts()["r0"] == 1
    r = await fleet.http.post("/admin/engines/r0/drain", headers=auth)
    assert r.status_code == 200
    assert r.json()["state"] == "draining" and r.json()["requests_in_flight"] == 1
    x = {"messages": [{"role": "user", "content": "x"}]}
    for _ in range(4):
        r = await fleet.http.post("/v1/chat/completions", headers=auth, json=x)
        assert r.json()["choices"][0]["message"]["content"] == "r1"
    gate.set()
    assert (await in_flight).status_code == 200  # the request in flight finished
    listing = (await fleet.http.get("/admin/engines", headers=auth)).json()
    r0 = next(e for e in listing["engines"] if e["name"] == "r0")
    assert (r0["state"], r0["requests_in_flight"], r0["draining"]) == ("draining", 0, True)
    assert listing["policy"] == "round_robin"
    assert listing["kv_events"] is False and listing["tokenize_failures"] is None
    r = await fleet.http.post("/admin/engines/r0/resume", headers=auth)
    assert r.json()["state"] == "ready"
    fleet["r0"].behaviour = None
    for _ in range(4):
        await fleet.http.post("/v1/chat/completions", headers=auth,
                              json={"messages": [{"role": "user", "content": "x"}]})  # fmt: skip
    assert fleet.counts()["r0"] >= 2


async def test_admin_needs_a_key_and_names_unknown_engines(make_fleet):
    fleet = await make_fleet(two(), api_keys=[KEY])
    assert (await fleet.http.get("/admin/engines")).status_code == 401
    assert (await fleet.http.post("/admin/engines/r0/drain")).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    r = await fleet.http.post("/admin/engines/nope/drain", headers=auth)
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "name" and "nope" in r.json()["error"]["message"]
    r = await fleet.http.get("/admin/engines", headers=auth)
    engine = r.json()["engines"][0]
    fields = {
        "name",
        "model",
        "state",
        "state_seconds",
        "requests_in_flight",
        "restarts",
        "estimated_hit_rate",
        "prefix_cache_hit_rate",
        "waiting",
        "kv_cache_usage",
    }
    assert fields <= set(engine)


async def test_metrics_count_requests_and_decisions_per_engine(make_fleet):
    fleet = await make_fleet(two(), policy="round_robin")
    for _ in range(4):
        await fleet.chat([{"role": "user", "content": "hi"}])
    assert await fleet.metric("tide_vllm_engine_requests_total", engine="r0") == 2
    assert await fleet.metric("tide_vllm_engine_requests_total", engine="r1") == 2
    assert await fleet.metric("tide_vllm_engine_in_flight", engine="r0") == 0
    assert (
        await fleet.metric("tide_vllm_routing_decisions_total", engine="r1", reason="round_robin")
        == 2
    )
    assert await fleet.metric("tide_vllm_engine_up", engine="r0") == 1
    r = await fleet.http.get("/metrics/vllm", params={"engine": "r1"})
    assert r.status_code == 200 and "vllm:num_requests_waiting" in r.text
    assert (await fleet.http.get("/metrics/vllm", params={"engine": "zz"})).status_code == 404


async def test_the_engines_own_gauges_are_read_for_routing(make_fleet):
    fleet = await make_fleet(two())
    fleet["r1"].metrics = fleet["r1"].metrics.replace("waiting 0.0", "waiting 7.0")
    provider = fleet.app.state.provider
    await provider.application.engines.scrape()
    listing = (await fleet.http.get("/admin/engines")).json()["engines"]
    waiting = {e["name"]: e["waiting"] for e in listing}
    assert waiting == {"r0": 0.0, "r1": 7.0}
    assert Counter(e["kv_cache_usage"] for e in listing) == Counter({0.1: 2})
