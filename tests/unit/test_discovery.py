"""`discover: dns://NAME:PORT`: one engine per address NAME resolves to, kept up to date as the
addresses change, with a resolver the test sets."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import re
import socket

import pytest

from tide_vllm.application.discovery import Discovery, Pool, engine_name
from tide_vllm.application.engines import NO_FEATURES, Engines, Upstream
from tide_vllm.domain.chat.entity import EngineState, EngineStatus, EngineUnavailable
from tide_vllm.infrastructure.vllm.discovery import resolve
from tide_vllm_cmd.app.options.workers import SharedDrains

READY = EngineStatus(EngineState.READY, True, "healthy")
UNCHECKED = EngineStatus(EngineState.EXTERNAL, False, "vLLM not checked yet")
POOL = Pool("pool", "m", "vllm-headless.default.svc.cluster.local", 8000)
VALID_NAME = re.compile(r"[a-z0-9_-]{1,32}")


class StubResolver:
    """Answers what the test says: addresses, or an OSError to raise."""

    def __init__(self, *addresses: str) -> None:
        self.answer: list[str] | OSError = list(addresses)
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if isinstance(self.answer, OSError):
            raise self.answer
        return list(self.answer)


class ProbedMonitor:
    """An external engine's monitor: unknown until asked, then what the engine says."""

    def __init__(self) -> None:
        self.status = UNCHECKED

    def current(self) -> EngineStatus:
        return self.status

    async def check(self) -> EngineStatus:
        self.status = READY
        return self.status


class World:
    def __init__(self, resolver: StubResolver, static: list[Upstream] | None = None) -> None:
        self.engines = Engines(
            static or [], default_model="m", policy="round_robin", discovered={"m": POOL.url}
        )
        self.built: dict[str, str] = {}
        self.released: list[str] = []
        self.discovery = Discovery(self.engines, [POOL], resolver, self.build, self.release)

    def build(self, pool: Pool, name: str, address: str) -> Upstream:
        host = f"[{address}]" if ":" in address else address
        self.built[name] = f"http://{host}:{pool.port}"
        return Upstream(
            name, pool.model, None, None, ProbedMonitor(),  # type: ignore[arg-type]
            base_url=self.built[name], probe=True,
        )  # fmt: skip

    async def release(self, upstream: Upstream) -> None:
        self.released.append(upstream.name)

    def names(self) -> list[str]:
        return [v.name for v in self.engines.views()]

    async def ask(self) -> str:
        async def answer(u: Upstream) -> str:
            return u.name

        return await self.engines.call("m", NO_FEATURES, answer)


async def test_each_address_becomes_an_engine_named_after_its_entry_and_address():
    resolver = StubResolver("10.0.0.5", "10.0.0.6")
    world = World(resolver)
    await world.discovery.refresh()
    assert resolver.asked == [(POOL.host, 8000)]
    assert world.names() == ["pool-10-0-0-5", "pool-10-0-0-6"]
    assert world.built["pool-10-0-0-5"] == "http://10.0.0.5:8000"
    assert world.discovery.found("pool") == {
        "pool-10-0-0-5": "10.0.0.5",
        "pool-10-0-0-6": "10.0.0.6",
    }
    # Each was asked before it joined, so it takes requests at once.
    assert all(v.state == "ready" for v in world.engines.views())
    assert {await world.ask() for _ in range(4)} == {"pool-10-0-0-5", "pool-10-0-0-6"}


async def test_an_ipv6_address_is_bracketed_in_its_url_and_made_a_valid_name():
    world = World(StubResolver("fd00::5"))
    await world.discovery.refresh()
    assert world.names() == ["pool-fd00--5"]
    assert world.built["pool-fd00--5"] == "http://[fd00::5]:8000"


async def test_new_addresses_join_and_gone_ones_leave():
    resolver = StubResolver("10.0.0.5", "10.0.0.6")
    world = World(resolver)
    await world.discovery.refresh()
    resolver.answer = ["10.0.0.6", "10.0.0.7"]
    await world.discovery.refresh()
    assert world.names() == ["pool-10-0-0-6", "pool-10-0-0-7"]
    await asyncio.sleep(0)
    assert world.released == ["pool-10-0-0-5"]  # it had no request in flight
    await world.discovery.refresh()  # nothing changed: nothing built again
    assert list(world.built) == ["pool-10-0-0-5", "pool-10-0-0-6", "pool-10-0-0-7"]


async def test_an_engine_that_leaves_is_released_only_once_its_requests_have_ended():
    resolver = StubResolver("10.0.0.5")
    world = World(resolver)
    await world.discovery.refresh()
    gate = asyncio.Event()

    async def held(u: Upstream) -> str:
        await gate.wait()
        return u.name

    in_flight = asyncio.create_task(world.engines.call("m", NO_FEATURES, held))
    await asyncio.sleep(0)
    resolver.answer = ["10.0.0.6"]
    await world.discovery.refresh()
    assert world.names() == ["pool-10-0-0-6"]
    assert await world.ask() == "pool-10-0-0-6"
    await asyncio.sleep(0.01)
    assert world.released == []
    gate.set()
    assert await in_flight == "pool-10-0-0-5"
    await asyncio.sleep(0.01)
    assert world.released == ["pool-10-0-0-5"]


async def test_a_name_that_resolves_to_nothing_is_a_warning_and_a_503_until_it_resolves(caplog):
    resolver = StubResolver()
    world = World(resolver)
    with caplog.at_level(logging.WARNING, "tide_vllm.discovery"):
        await world.discovery.refresh()
        await world.discovery.refresh()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once, not at every look
    assert f"{POOL.url} resolves to no address" in warnings[0]
    with pytest.raises(EngineUnavailable, match=f"no engine of model m is known now.*{POOL.url}"):
        await world.ask()
    assert not world.engines.health().healthy
    resolver.answer = ["10.0.0.5"]
    await world.discovery.refresh()
    assert await world.ask() == "pool-10-0-0-5" and world.engines.health().healthy
    resolver.answer = []  # every pod gone
    await world.discovery.refresh()
    assert world.names() == [] and not world.engines.health().healthy


async def test_a_lookup_that_fails_keeps_the_engines_as_they_were(caplog):
    resolver = StubResolver("10.0.0.5")
    world = World(resolver)
    await world.discovery.refresh()
    resolver.answer = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    with caplog.at_level(logging.WARNING, "tide_vllm.discovery"):
        await world.discovery.refresh()
    assert world.names() == ["pool-10-0-0-5"]
    assert "cannot look up" in caplog.text and "Temporary failure" in caplog.text


async def test_a_found_name_that_another_engine_has_is_not_added(caplog):
    taken = Upstream("pool-10-0-0-5", "m", None, None, ProbedMonitor())  # type: ignore[arg-type]
    world = World(StubResolver("10.0.0.5", "10.0.0.6"), static=[taken])
    with caplog.at_level(logging.ERROR, "tide_vllm.discovery"):
        await world.discovery.refresh()
        await world.discovery.refresh()
    assert world.names() == ["pool-10-0-0-5", "pool-10-0-0-6"]
    assert world.engines.upstreams["pool-10-0-0-5"] is taken
    assert caplog.text.count("an engine of that name exists") == 1


async def test_the_lookups_go_on_every_interval():
    resolver = StubResolver("10.0.0.5")
    world = World(resolver)
    world.discovery.interval = 0.01
    task = asyncio.create_task(world.discovery.run())

    async def until(names: list[str]) -> None:
        while world.names() != names:
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(until(["pool-10-0-0-5"]), 5)
        resolver.answer = ["10.0.0.6"]
        await asyncio.wait_for(until(["pool-10-0-0-6"]), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await world.discovery.aclose()


def test_engine_names_are_valid_short_and_the_same_every_time():
    names = [
        engine_name("pool", "10.0.0.5"),
        engine_name("pool", "2001:db8:85a3::8a2e:370:7334"),
        engine_name("a-rather-long-pool-name", "10.200.100.250"),
        engine_name("pool", "FE80::1%eth0"),
    ]
    assert names[0] == "pool-10-0-0-5"
    assert all(VALID_NAME.fullmatch(n) for n in names), names
    assert names[1] == engine_name("pool", "2001:db8:85a3::8a2e:370:7334")
    assert names[1].startswith("pool-2001-db8-85a3--8a2") and len(names[1]) == 32
    assert len(set(names)) == 4
    assert engine_name("pool", "2001:db8:85a3::8a2e:370:7335") != names[1]


async def test_the_resolver_gives_sorted_addresses_each_once():
    assert await resolve("10.0.0.5", 8000) == ["10.0.0.5"]
    assert await resolve("::1", 8000) == ["::1"]
    assert "127.0.0.1" in await resolve("localhost", 8000)


async def test_the_resolver_says_nothing_for_a_name_without_address_and_raises_when_dns_fails(
    monkeypatch,
):
    loop = asyncio.get_running_loop()

    async def answers(host: str, port: int, **kwargs: object) -> list[tuple]:
        if host == "gone.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == "down.test":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        tcp = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        return [
            (socket.AF_INET6, *tcp, ("fd00::2", port, 0, 0)),
            (socket.AF_INET, *tcp, ("10.0.0.10", port)),
            (socket.AF_INET, *tcp, ("10.0.0.9", port)),
            (socket.AF_INET, *tcp, ("10.0.0.10", port)),
        ]

    monkeypatch.setattr(loop, "getaddrinfo", answers)
    assert await resolve("pods.test", 8000) == ["10.0.0.9", "10.0.0.10", "fd00::2"]
    assert await resolve("gone.test", 8000) == []
    with pytest.raises(OSError, match="Temporary failure"):
        await resolve("down.test", 8000)


def _drain_in_another_worker(drains: SharedDrains, name: str) -> None:
    drains.set(name, True)


def test_with_several_workers_a_drain_holds_in_every_worker_found_engines_included():
    mp = multiprocessing.get_context("spawn")
    drains = SharedDrains(mp)
    assert not drains.get("pool-10-0-0-5")
    other = mp.Process(target=_drain_in_another_worker, args=(drains, "pool-10-0-0-5"))
    other.start()
    other.join(30)
    assert other.exitcode == 0
    drains.set("gpu0", True)
    assert drains.get("pool-10-0-0-5") and drains.get("gpu0")
    assert not drains.get("pool-10-0-0-6")
    drains.set("pool-10-0-0-5", False)
    assert not drains.get("pool-10-0-0-5") and drains.get("gpu0")
