"""Engines found by name (`discover: dns://NAME:PORT`), in process: the real app, a resolver the
test sets, and one fake engine per address (one httpx.MockTransport answering for all). What a
user notices: requests spread over the addresses; an address gone takes no more requests while
one in flight on it finishes; a new address takes requests; a name without address is a 503
saying so, until it has one."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from tide_vllm.domain.chat.factory import ChatDefaults
from tide_vllm.provider.provider import DiscoverySettings, ProviderSettings
from tide_vllm_cmd.app.options.plugin_web_handler import build_app

from .conftest import serving
from .test_fleet_routing import completion

MODEL = "Qwen2.5-7B-Instruct"
NAME = "vllm-headless.default.svc.cluster.local"
KEY = "discovery-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Resolver:
    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)

    async def __call__(self, host: str, port: int) -> list[str]:
        assert (host, port) == (NAME, 8000)
        return list(self.addresses)


class Engines:
    """Every address's fake vLLM: answers with the address it was reached at, and can hold
    its chats until told."""

    def __init__(self) -> None:
        self.received: dict[str, int] = {}
        self.held: set[str] = set()
        self.gate = asyncio.Event()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        address = request.url.host
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL}]})
        if request.url.path == "/metrics":
            return httpx.Response(200, text="vllm:num_requests_waiting 0.0\n")
        self.received[address] = self.received.get(address, 0) + 1
        if address in self.held:
            await self.gate.wait()
        body = json.loads(request.content)
        return httpx.Response(200, json=completion(body["model"], address))


class Service:
    def __init__(self, app: Any, http: httpx.AsyncClient, engines: Engines) -> None:
        self.app = app
        self.http = http
        self.engines = engines

    async def chat(self, text: str = "hi") -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        return await self.http.post("/v1/chat/completions", json=body, headers=AUTH)

    async def answered_by(self, text: str = "hi") -> str:
        r = await self.chat(text)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"])

    async def listed(self) -> dict[str, str]:
        r = await self.http.get("/admin/engines", headers=AUTH)
        return {e["name"]: e["state"] for e in r.json()["engines"]}

    async def look_again(self) -> None:
        await self.app.state.provider.discovery.refresh()


@pytest.fixture
async def start() -> AsyncIterator[Callable[[Resolver], Awaitable[Service]]]:
    async with contextlib.AsyncExitStack() as opened:

        async def make(resolver: Resolver) -> Service:
            engines = Engines()
            settings = ProviderSettings(
                base_url="http://unused.test",
                timeout=5,
                defaults=ChatDefaults(MODEL, "", 64, 0.7, 0.9),
                discovered=(DiscoverySettings("pool", MODEL, NAME, 8000),),
                policy="round_robin",
            )
            app = build_app(
                settings,
                transport=httpx.MockTransport(engines.handle),
                resolver=resolver,
                api_keys=[KEY],
            )
            http = await opened.enter_async_context(serving(app, timeout=10))
            return Service(app, http, engines)

        yield make


async def test_requests_are_spread_over_the_addresses_the_name_resolves_to(start):
    service = await start(Resolver("10.0.0.5", "10.0.0.6"))
    assert await service.listed() == {"pool-10-0-0-5": "ready", "pool-10-0-0-6": "ready"}
    answers = [await service.answered_by() for _ in range(4)]
    assert sorted(answers) == ["10.0.0.5", "10.0.0.5", "10.0.0.6", "10.0.0.6"]
    health = (await service.http.get("/health")).json()
    assert health["vllm_healthy"] and {e["name"] for e in health["engines"]} == {
        "pool-10-0-0-5",
        "pool-10-0-0-6",
    }
    metrics = (await service.http.get("/metrics", headers=AUTH)).text
    assert 'tide_vllm_engine_up{engine="pool-10-0-0-6"} 1.0' in metrics
    assert 'tide_vllm_engine_requests_total{engine="pool-10-0-0-5"} 2.0' in metrics


async def test_an_address_gone_takes_no_more_requests_while_its_request_in_flight_finishes(start):
    resolver = Resolver("10.0.0.5", "10.0.0.6")
    service = await start(resolver)
    service.engines.held.add("10.0.0.5")
    first = asyncio.create_task(service.answered_by("long"))
    second = asyncio.create_task(service.answered_by("short"))
    await asyncio.wait({second}, timeout=5)
    assert second.result() == "10.0.0.6" and not first.done()  # held on 10.0.0.5

    resolver.addresses = ["10.0.0.6"]
    await service.look_again()
    assert await service.listed() == {"pool-10-0-0-6": "ready"}
    assert [await service.answered_by() for _ in range(3)] == ["10.0.0.6"] * 3
    assert service.engines.received["10.0.0.5"] == 1
    provider = service.app.state.provider
    assert "pool-10-0-0-5" in provider.clients  # still in use
    metrics = (await service.http.get("/metrics", headers=AUTH)).text
    assert 'tide_vllm_engine_in_flight{engine="pool-10-0-0-5"} 1.0' in metrics

    service.engines.gate.set()
    assert await asyncio.wait_for(first, 5) == "10.0.0.5"
    for _ in range(100):
        if "pool-10-0-0-5" not in provider.clients:
            break
        await asyncio.sleep(0.01)
    assert "pool-10-0-0-5" not in provider.clients  # closed once its request had ended
    metrics = (await service.http.get("/metrics", headers=AUTH)).text
    assert 'engine="pool-10-0-0-5"' not in metrics  # its series went with it
    assert 'tide_vllm_engine_requests_total{engine="pool-10-0-0-6"} 4.0' in metrics

    resolver.addresses = ["10.0.0.6", "10.0.0.7"]
    await service.look_again()
    assert await service.listed() == {"pool-10-0-0-6": "ready", "pool-10-0-0-7": "ready"}
    answers = {await service.answered_by() for _ in range(4)}
    assert answers == {"10.0.0.6", "10.0.0.7"}


async def test_an_ipv6_address_is_reached_in_brackets(start):
    service = await start(Resolver("fd00::5"))
    assert await service.listed() == {"pool-fd00--5": "ready"}
    assert await service.answered_by() == "fd00::5"
    listing = (await service.http.get("/admin/engines", headers=AUTH)).json()["engines"]
    assert listing[0]["base_url"] == "http://[fd00::5]:8000"


async def test_a_name_without_address_is_a_503_saying_so_until_it_has_one(start):
    resolver = Resolver()
    service = await start(resolver)
    r = await service.chat()
    assert r.status_code == 503
    assert f"dns://{NAME}:8000" in r.json()["error"]["message"]
    health = await service.http.get("/health")
    assert health.status_code == 503 and MODEL in health.json()["status"]
    resolver.addresses = ["10.0.0.5"]
    await service.look_again()
    assert await service.answered_by() == "10.0.0.5"
    assert (await service.http.get("/health")).status_code == 200
