"""Engines joining and leaving the fleet while requests run (the engines found by discovery):
a new one takes requests once healthy, one that leaves takes no new request while those it
has in flight finish, and a model whose engines are all to be found is served all the same."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import READY, SettableMonitor
from tide_vllm.application.engines import NO_FEATURES, Engines, Upstream
from tide_vllm.domain.chat.entity import (
    EngineState,
    EngineStatus,
    EngineUnavailable,
    ModelNotFound,
)
from tide_vllm.domain.fleet import UnknownEngine

UNCHECKED = EngineStatus(EngineState.EXTERNAL, False, "vLLM not checked yet")
WHERE = "dns://pool.test:8000"


def upstream(name: str, model: str = "m", status: EngineStatus = READY) -> Upstream:
    return Upstream(name, model, None, None, SettableMonitor(status))  # type: ignore[arg-type]


async def answer(u: Upstream) -> str:
    return u.name


async def ask(engines: Engines, model: str = "m") -> str:
    return await engines.call(model, NO_FEATURES, answer)


def discovered() -> Engines:
    return Engines([], default_model="m", policy="round_robin", discovered={"m": WHERE})


async def test_an_engine_added_takes_requests_once_its_monitor_says_it_is_healthy():
    engines = Engines([upstream("a")], default_model="m", policy="round_robin")
    late = upstream("b", status=UNCHECKED)
    engines.add(late)
    assert engines.single is None
    assert {await ask(engines) for _ in range(4)} == {"a"}
    late.monitor.status = READY  # type: ignore[attr-defined]
    assert {await ask(engines) for _ in range(4)} == {"a", "b"}
    assert [v.name for v in engines.views()] == ["a", "b"]
    with pytest.raises(ValueError, match="already"):
        engines.add(upstream("b"))


async def test_a_removed_engine_finishes_its_request_in_flight_and_takes_no_new_one():
    engines = discovered()
    engines.add(upstream("a"))
    engines.add(upstream("b"))
    gate = asyncio.Event()

    async def held(u: Upstream) -> str:
        await gate.wait()
        return u.name

    in_flight = asyncio.create_task(engines.call("m", NO_FEATURES, held))
    await asyncio.sleep(0)
    on = next(v.name for v in engines.views() if v.requests_in_flight == 1)
    gone = engines.remove(on)
    assert [v.name for v in engines.views()] == ["b" if on == "a" else "a"]
    assert {await ask(engines) for _ in range(4)} == {"b" if on == "a" else "a"}
    drained = asyncio.create_task(engines.drained(gone))
    await asyncio.sleep(0)
    assert not drained.done()
    gate.set()
    assert await in_flight == on
    await asyncio.wait_for(drained, 1)
    with pytest.raises(UnknownEngine):
        engines.remove(on)


async def test_an_engine_removed_without_requests_is_drained_at_once():
    engines = discovered()
    engines.add(upstream("a"))
    await asyncio.wait_for(engines.drained(engines.remove("a")), 1)


async def test_an_engine_found_again_under_its_name_is_a_new_one():
    engines = discovered()
    engines.add(upstream("a"))
    gate = asyncio.Event()

    async def held(u: Upstream) -> str:
        await gate.wait()
        return u.name

    old_request = asyncio.create_task(engines.call("m", NO_FEATURES, held))
    await asyncio.sleep(0)
    old = engines.remove("a")
    engines.add(upstream("a"))
    assert await ask(engines) == "a"
    gate.set()
    await old_request
    await asyncio.wait_for(engines.drained(old), 1)
    assert engines.views()[0].requests_in_flight == 0 and engines.views()[0].dispatched == 1


async def test_a_model_whose_engines_are_all_to_be_found_is_a_503_saying_where_until_one_is():
    engines = discovered()
    assert engines.single is None and engines.model_of("m") == "m"
    with pytest.raises(EngineUnavailable, match=f"no engine of model m is known now.*{WHERE}"):
        await ask(engines)
    with pytest.raises(ModelNotFound):
        await ask(engines, "zz")
    health = engines.health()
    assert not health.healthy and "no ready engine for model m" in health.detail
    with pytest.raises(EngineUnavailable):
        engines.upstream(None)
    engines.add(upstream("a"))
    assert await ask(engines) == "a" and engines.health().healthy
    engines.remove("a")
    assert not engines.health().healthy and engines.model_of("m") == "m"


async def test_a_fleet_that_may_find_engines_is_never_a_fleet_of_one():
    engines = Engines([upstream("a")], default_model="m", discovered={"m": WHERE})
    assert engines.single is None
    alone = Engines([upstream("a")], default_model="m")
    assert alone.single is not None
    alone.add(upstream("b"))
    alone.remove("b")
    assert alone.single is None  # another may come again


def test_engines_need_an_engine_or_a_place_to_find_them():
    with pytest.raises(ValueError):
        Engines([], default_model="m")


async def test_a_check_that_raises_leaves_the_engines_last_status():
    class Closed(SettableMonitor):
        async def check(self) -> EngineStatus:
            raise RuntimeError("Session is closed")  # its client closed as it left

    closed = Upstream("b", "m", None, None, Closed())  # type: ignore[arg-type]
    engines = Engines([upstream("a"), closed], default_model="m")
    health = await engines.check()
    assert health.healthy and [v.state for v in health.engines] == ["ready", "ready"]
