"""Routing's precise mode, in process: the real app with two fake engines that answer vLLM's
`POST /tokenize` and publish KV-cache events on real ZeroMQ sockets, in vLLM's frames and
msgpack. What a user notices: a request goes to the engine whose cache holds its prefix (as the
engine itself says, even when the gateway never sent it there), an engine that evicted a
prefix no longer attracts it, routing keeps working when token ids cannot be had, and
operators see the events flow in /admin/engines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
import zmq

from tide_vllm.domain.chat.factory import ChatDefaults
from tide_vllm.provider.provider import EngineSettings, ProviderSettings
from tide_vllm_cmd.app.options.plugin_web_handler import build_app

from .conftest import serving
from .test_fleet_routing import MODEL, FakeEngine, conversation

BLOCK = 16  # tokens a block, as the fake engines say in their events


def token_ids(messages: list[dict[str, str]]) -> list[int]:
    """The fake's chat template: each message tagged with its role, then the generation
    prompt; a byte a token. A conversation's next turn starts with its last turn's tokens."""
    text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
    return list(text.encode())


class Publisher:
    """An engine's KV-cache event publisher: vLLM's three frames (topic, sequence number,
    msgpack batch [ts, events, rank]) on a PUB socket bound to an ipc:// endpoint."""

    def __init__(self, endpoint: str, salt: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.bind(endpoint)
        self.salt = salt
        self.seq = 0

    def send(self, *events: dict[str, Any]) -> None:
        payload = msgspec.msgpack.encode([time.time(), list(events), None])
        self.socket.send_multipart([b"", self.seq.to_bytes(8, "big"), payload])
        self.seq += 1

    def hashes(self, ids: list[int]) -> list[bytes]:
        """The engine's own names of the whole blocks of `ids` (a hash of its own, as vLLM's)."""
        return [
            f"{self.salt}:{hash(tuple(ids[: (i + 1) * BLOCK]))}".encode()
            for i in range(len(ids) // BLOCK)
        ]

    def stored(self, ids: list[int]) -> list[bytes]:
        names = self.hashes(ids)
        self.send(
            {
                "type": "BlockStored",
                "block_hashes": names,
                "parent_block_hash": None,
                "token_ids": ids[: len(names) * BLOCK],
                "block_size": BLOCK,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
            }
        )
        return names

    def removed(self, names: list[bytes]) -> None:
        self.send({"type": "BlockRemoved", "block_hashes": names, "medium": "GPU"})

    def close(self) -> None:
        self.socket.close(linger=0)


@dataclass
class CachingEngine(FakeEngine):
    """A fake engine that tokenizes as its template says and, as vLLM does, announces the
    blocks of each chat it serves."""

    publisher: Publisher | None = None
    announce: bool = True  # publish the blocks of each chat served
    tokenized: int = 0
    tokenize_fails: bool = False
    served: list[list[int]] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/tokenize":
            self.tokenized += 1
            if self.tokenize_fails:
                return httpx.Response(500, json={"error": {"message": "broken tokenizer"}})
            ids = token_ids(json.loads(request.content)["messages"])
            return httpx.Response(200, json={"count": len(ids), "tokens": ids})
        if request.url.path == "/v1/chat/completions" and self.announce and self.publisher:
            ids = token_ids(json.loads(request.content)["messages"])
            self.served.append(ids)
            self.publisher.stored(ids)
        return await super().handle(request)


@dataclass
class PreciseFleet:
    engines: dict[str, CachingEngine]
    http: httpx.AsyncClient
    app: Any
    workers: list[PreciseFleet] = field(default_factory=list)  # all the apps made, this first

    def publisher(self, name: str) -> Publisher:
        publisher = self.engines[name].publisher
        assert publisher is not None
        return publisher

    async def chat(self, messages: list[dict[str, str]]) -> str:
        r = await self.http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": messages}
        )
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"])  # the engine's name

    async def listing(self) -> dict[str, dict[str, Any]]:
        engines = (await self.http.get("/admin/engines")).json()["engines"]
        return {e["name"]: e for e in engines}

    async def until(self, check: Callable[[dict[str, dict[str, Any]]], bool]) -> None:
        deadline = time.monotonic() + 10
        while not check(await self.listing()):
            listing = await self.listing()
            assert time.monotonic() < deadline, {
                name: {k: e[k] for k in ("kv_event_batches", "cached_blocks", "dispatched")}
                for name, e in listing.items()
            }
            await asyncio.sleep(0.02)

    async def decisions(self, reason: str) -> float:
        text = (await self.http.get("/metrics")).text
        total = 0.0
        for line in text.splitlines():
            if (
                line.startswith("tide_vllm_routing_decisions_total{")
                and f'reason="{reason}"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # A short path: a Unix socket's is at most 107 bytes, and pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="tide-kv-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def make_precise(socket_dir: str) -> AsyncIterator[Callable[..., Awaitable[PreciseFleet]]]:
    async with contextlib.AsyncExitStack() as opened:

        async def make(announce: bool = True, workers: int = 1) -> PreciseFleet:
            engines = {name: CachingEngine(name, MODEL) for name in ("r0", "r1")}
            endpoints = {name: f"ipc://{socket_dir}/{name}.sock" for name in engines}
            for name, engine in engines.items():
                engine.publisher = Publisher(endpoints[name], salt=name)
                opened.callback(engine.publisher.close)

            async def route(request: httpx.Request) -> httpx.Response:
                return await engines[request.url.host.removesuffix(".test")].handle(request)

            settings = ProviderSettings(
                base_url="http://unused.test",
                timeout=5,
                defaults=ChatDefaults(MODEL, "", 64, 0.7, 0.9),
                engines=tuple(
                    EngineSettings(
                        name, MODEL, f"http://{name}.test:8000", kv_events=(endpoints[name],)
                    )
                    for name in engines
                ),
                kv_events=True,
            )
            fleets = []
            for _ in range(workers):  # each a web worker of its own: its own app, one process
                app = build_app(
                    settings,
                    transport=httpx.MockTransport(route),
                    monitors={name: e.monitor for name, e in engines.items()},
                )
                http = await opened.enter_async_context(serving(app, timeout=10))
                fleets.append(PreciseFleet(engines, http, app))
            # ZeroMQ's subscriptions take a moment to reach the publisher: say nothing of
            # consequence until each engine's readers have read something.
            deadline = time.monotonic() + 10
            for fleet in fleets:
                while not all(e["kv_event_batches"] for e in (await fleet.listing()).values()):
                    assert time.monotonic() < deadline, "the events' readers never connected"
                    for name in engines:
                        fleet.publisher(name).send({"type": "AllBlocksCleared"})
                    await asyncio.sleep(0.05)
            for engine in engines.values():
                engine.announce = announce
            fleets[0].workers = fleets
            return fleets[0]

        yield make


async def test_a_request_goes_to_the_engine_whose_cache_holds_its_prefix(make_precise):
    fleet = await make_precise()
    tides, jazz = conversation("tides", 2), conversation("jazz", 2)
    # Each engine's cache got a conversation from elsewhere (another gateway, a restart of
    # this one): only its events tell.
    r1_blocks = fleet.publisher("r1").stored(token_ids(tides))
    r0_blocks = fleet.publisher("r0").stored(token_ids(jazz))
    await fleet.until(
        lambda e: (
            e["r1"]["cached_blocks"] == len(r1_blocks)
            and e["r0"]["cached_blocks"] == len(r0_blocks)
        )
    )
    assert await fleet.chat(tides) == "r1"
    assert await fleet.chat(jazz) == "r0"
    assert await fleet.decisions("affinity") == 2
    # Each request's token ids were asked of an engine, one call a request.
    assert sum(e.tokenized for e in fleet.engines.values()) == 2


async def test_a_conversation_follows_its_prefix_to_the_engine_that_holds_it_now(make_precise):
    fleet = await make_precise()
    home = await fleet.chat(conversation("tides", 1))
    away = "r1" if home == "r0" else "r0"
    publisher = fleet.publisher(home)
    served = fleet.engines[home].served[-1]
    await fleet.until(lambda e: e[home]["cached_blocks"] == len(served) // BLOCK)
    # Still cached: the next turn follows it home.
    assert await fleet.chat(conversation("tides", 2)) == home
    # Home evicts the conversation (its cache was needed elsewhere), and no engine holds it:
    # the next turn still goes where it was sent, so that its turns stay together.
    for ids in fleet.engines[home].served:
        publisher.removed(publisher.hashes(ids))
    await fleet.until(lambda e: e[home]["cached_blocks"] == 0)
    assert await fleet.chat(conversation("tides", 3)) == home
    # Home evicts it again, and the other engine says it holds the conversation (another
    # gateway sent it there): the next turn goes where the cache is.
    for ids in fleet.engines[home].served:
        publisher.removed(publisher.hashes(ids))
    held = fleet.publisher(away).stored(token_ids(conversation("tides", 3)))
    await fleet.until(
        lambda e: e[home]["cached_blocks"] == 0 and e[away]["cached_blocks"] == len(held)
    )
    assert await fleet.chat(conversation("tides", 4)) == away
    assert await fleet.decisions("affinity") == 3


async def test_web_workers_keep_a_conversation_on_one_engine_by_its_events(make_precise):
    first, second = (await make_precise(workers=2)).workers
    # The second worker has placed a conversation of its own, so that, knowing nothing of the
    # first's, it would send the first turn it sees of "tides" to the other engine in turn.
    await second.chat(conversation("jazz", 1))
    turns = 6
    homes = []
    for turn in range(1, turns + 1):
        worker = first if turn % 2 else second  # each turn reaches the other worker
        homes.append(await worker.chat(conversation("tides", turn)))
        home = homes[-1]
        served = len(first.engines[home].served[-1]) // BLOCK
        await first.until(lambda e, home=home, n=served: e[home]["cached_blocks"] >= n)
        await second.until(lambda e, home=home, n=served: e[home]["cached_blocks"] >= n)
    assert len(set(homes)) == 1, homes
    assert await second.decisions("affinity") == turns // 2  # its turns, by the events


async def test_routing_goes_on_from_the_text_when_no_engine_gives_token_ids(make_precise):
    fleet = await make_precise(announce=False)
    for engine in fleet.engines.values():
        engine.tokenize_fails = True
    homes = {await fleet.chat(conversation("tides", turn)) for turn in range(1, 5)}
    assert len(homes) == 1  # the conversation keeps to one engine, on its text's blocks
    assert sum(e.tokenized for e in fleet.engines.values()) == 4
    admin = (await fleet.http.get("/admin/engines")).json()
    assert admin["kv_events"] is True and admin["tokenize_failures"] == 4


async def test_an_engine_whose_events_start_again_is_thought_empty(make_precise):
    fleet = await make_precise(announce=False)
    publisher = fleet.publisher("r0")
    first = publisher.stored(token_ids(conversation("tides", 3)))
    await fleet.until(lambda e: e["r0"]["cached_blocks"] == len(first))
    # A new vLLM process: its sequence starts at 0 again, with an empty cache.
    publisher.seq = 0
    again = publisher.stored(token_ids([{"role": "user", "content": "a new start " * 8}]))
    await fleet.until(lambda e: e["r0"]["cached_blocks"] == len(again))
    assert len(again) < len(first)
