"""Several engines, each supervised as the single one is: fake vLLM executables
(tests/fakes/fake_vllm.py), each with its own FAKE_VLLM_MODE in its engine's `env`, wired by the
real plugin (VLLMPlugin) in-process, then the real service process for what needs SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import FAKE_VLLM, PYTHON, alive, descendants, free_port
from tests.service import ServiceProcess, fake_fleet_config
from tide_vllm.domain.chat.entity import EngineState
from tide_vllm.infrastructure.vllm import supervisor
from tide_vllm.infrastructure.vllm.fleet import ExternalEngine, models_ready
from tide_vllm.infrastructure.vllm.processes import group_members, listening_pids
from tide_vllm.infrastructure.vllm.supervisor import VLLMServerManager, VLLMStartError
from tide_vllm_cmd.app.options.options import Config
from tide_vllm_cmd.app.options.plugin_vllm import VLLMPlugin
from tide_vllm_cmd.app.server import Context


def fleet_config(tmp_path: Path, modes: dict[str, str], **vllm: object) -> Config:
    """Engines named as `modes`' keys; each writes its pids to tmp_path/<name>.pids."""
    shared = {"startup_timeout": 20, "stop_timeout": 5, "health_interval": 0.2, **vllm}
    config = fake_fleet_config(modes, pid_dir=tmp_path, **shared)
    for engine in config["engines"]:
        engine["env"]["FAKE_VLLM_PIDFILE"] = str(tmp_path / f"{engine['name']}.pids")
    return Config.model_validate(config)


async def start_fleet(tmp_path: Path, config: Config) -> tuple[VLLMPlugin, Context]:
    ctx = Context(tmp_path / "tide-vllm.yaml", config)
    plugin = VLLMPlugin()
    await plugin.start(ctx)
    return plugin, ctx


def manager(ctx: Context, name: str) -> VLLMServerManager:
    engine = ctx.engines[name]
    assert isinstance(engine, VLLMServerManager)
    return engine


def pids_of(tmp_path: Path, name: str) -> list[int]:
    path = tmp_path / f"{name}.pids"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def wait_for(condition, timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout}s"
        await asyncio.sleep(0.02)


@pytest.fixture
def fast_ready_polls(monkeypatch):
    # Readiness is polled every second; a finer poll lets the timing below say what it means.
    monkeypatch.setattr(supervisor, "READY_POLL_INTERVAL", 0.1)


async def test_two_engines_start_in_parallel_each_with_its_own_lines(
    tmp_path, caplog, fast_ready_polls
):
    caplog.set_level(logging.INFO)
    config = fleet_config(tmp_path, {"a": "delay=2,grandchild", "b": "delay=2,grandchild"})
    started = time.monotonic()
    plugin, ctx = await start_fleet(tmp_path, config)
    try:
        assert plugin.fleet is not None
        await asyncio.wait_for(plugin.fleet.wait_ready(), 20)
        took = time.monotonic() - started
        assert took < 3.5, f"two engines of 2 s each took {took:.1f}s: not in parallel"
        assert models_ready(ctx.engines) == {"fake-model": True}
        a, b = manager(ctx, "a"), manager(ctx, "b")
        assert ctx.engines["a"] is a and ctx.engines["b"] is b
        assert ctx.engine_configs["a"].api_key == a.api_key
        assert ctx.engine_configs["b"].api_key == b.api_key
        assert a.pid != b.pid
        assert set(pids_of(tmp_path, "a")) <= set(group_members(a.pid))
        assert set(pids_of(tmp_path, "b")) <= set(group_members(b.pid))
        ports = {ctx.engine_configs[n].port for n in "ab"}
        assert all(listening_pids(port) for port in ports) and len(ports) == 2
    finally:
        await plugin.stop(ctx)
    names = {r.name for r in caplog.records}
    assert {"vllm.a", "vllm.b", "tide_vllm.supervisor.a", "tide_vllm.supervisor.b"} <= names
    for name in "ab":
        said = [r.getMessage() for r in caplog.records if r.name == f"tide_vllm.supervisor.{name}"]
        assert any(m.startswith("vLLM is ready after") for m in said), said
        fake = [r.getMessage() for r in caplog.records if r.name == f"vllm.{name}"]
        port = ctx.engine_configs[name].port
        assert any(f"fake vLLM ready on port {port}" in m for m in fake), fake
    assert not any(alive(p) for n in "ab" for p in pids_of(tmp_path, n))


async def test_one_engine_crashing_is_restarted_alone_while_the_other_stays_ready(tmp_path):
    config = fleet_config(tmp_path, {"a": "die_once=1,grandchild", "b": "grandchild"})
    plugin, ctx = await start_fleet(tmp_path, config)
    try:
        a, b = manager(ctx, "a"), manager(ctx, "b")
        await asyncio.wait_for(plugin.fleet.wait_ready(), 20)  # type: ignore[union-attr]
        first_a, group_b = pids_of(tmp_path, "a"), b.pid
        seen_b: set[EngineState] = set()

        def a_restarted() -> bool:
            seen_b.add(b.current().state)
            return a.restarts == 1 and a.current().state is EngineState.READY

        await wait_for(lambda: a.current().state is EngineState.RESTARTING, 10, "restarting")
        assert models_ready(ctx.engines) == {"fake-model": True}  # b serves meanwhile
        await wait_for(a_restarted, 20, "restarted")
        assert seen_b == {EngineState.READY}
        assert (b.restarts, b.pid) == (0, group_b)
        assert not any(alive(p) for p in first_a), "what was left of the dead engine still runs"
    finally:
        await plugin.stop(ctx)


async def test_the_engines_are_stopped_at_once_and_every_group_is_gone(tmp_path):
    modes = {"a": "ignore_sigterm,grandchild", "b": "ignore_sigterm,grandchild"}
    config = fleet_config(tmp_path, modes, stop_timeout=2)
    plugin, ctx = await start_fleet(tmp_path, config)
    await asyncio.wait_for(plugin.fleet.wait_ready(), 20)  # type: ignore[union-attr]
    groups = [manager(ctx, n).pid for n in "ab"]
    pids = pids_of(tmp_path, "a") + pids_of(tmp_path, "b")
    assert len(pids) == 4
    started = time.monotonic()
    await plugin.stop(ctx)
    took = time.monotonic() - started
    assert 2 <= took < 3.8, f"two stops of 2 s grace each took {took:.1f}s: not at once"
    assert not any(alive(p) for p in pids)
    assert all(group_members(g) == [] for g in groups if g)
    assert {manager(ctx, n).current().state for n in "ab"} == {EngineState.STOPPED}


async def test_a_first_start_failing_stops_tide_vllm_naming_the_engine(tmp_path):
    config = fleet_config(tmp_path, {"a": "", "b": "exit=3"})
    plugin, ctx = await start_fleet(tmp_path, config)
    try:
        await asyncio.wait_for(ctx.stopping.wait(), 20)
        assert ctx.exit_code == 1
        assert manager(ctx, "b").current().state is EngineState.FAILED
        assert "exited with code 3" in manager(ctx, "b").current().detail
    finally:
        await plugin.stop(ctx)
    assert not any(alive(p) for n in "ab" for p in pids_of(tmp_path, n))


async def test_a_taken_port_of_the_second_engine_is_refused_before_the_first_is_launched(
    tmp_path,
):
    config = fleet_config(tmp_path, {"a": "", "b": ""})
    port = config.fleet()[1].port
    foreign = subprocess.Popen(
        [PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for(lambda: bool(listening_pids(port)), 10, "listening")
        ctx = Context(tmp_path / "tide-vllm.yaml", config)
        with pytest.raises(VLLMStartError) as info:
            await VLLMPlugin().start(ctx)
        assert f"engines[1].port {port} is already in use by pid {foreign.pid}" in str(info.value)
        assert "engines[1].auto_start: false" in str(info.value)
        assert pids_of(tmp_path, "a") == [], "no engine may be launched"
        assert foreign.poll() is None
    finally:
        foreign.kill()
        foreign.wait()


async def test_an_external_engine_down_shows_as_not_ready_and_up_once_it_answers(tmp_path):
    config = fake_fleet_config({"a": ""}, startup_timeout=20, health_interval=0.2)
    remote_port = free_port()
    config["engines"].append(
        {"name": "remote", "auto_start": False, "port": remote_port, "model_name": "big"}
    )
    plugin, ctx = await start_fleet(tmp_path, Config.model_validate(config))
    remote = None
    try:
        assert isinstance(ctx.engines["remote"], ExternalEngine)
        await asyncio.wait_for(plugin.fleet.wait_ready(), 20)  # type: ignore[union-attr]
        await wait_for(lambda: "unreachable" in ctx.engines["remote"].current().detail, 5)
        assert models_ready(ctx.engines) == {"fake-model": True, "big": False}
        assert ctx.engines["remote"].current().state is EngineState.EXTERNAL
        remote = subprocess.Popen(
            [PYTHON, str(FAKE_VLLM), "--port", str(remote_port), "--served-model-name", "big"],
            stdout=subprocess.DEVNULL,
        )
        await wait_for(lambda: models_ready(ctx.engines)["big"], 15, "seen up")
        remote.kill()
        remote.wait()
        await wait_for(lambda: not models_ready(ctx.engines)["big"], 5, "seen down")
    finally:
        await plugin.stop(ctx)
        if remote is not None and remote.poll() is None:
            remote.kill()
            remote.wait()
    assert remote.returncode is not None


def test_sigkill_of_tide_vllm_leaves_no_process_of_any_engine(tmp_path):
    config = fake_fleet_config({"a": "grandchild", "b": "grandchild"})
    service = ServiceProcess(config, tmp_path)
    try:
        service.wait_healthy(timeout=30)
        deadline = time.monotonic() + 20
        while not all(listening_pids(e["port"]) for e in config["engines"]):
            assert time.monotonic() < deadline, service.log()[-3000:]
            time.sleep(0.1)
        tree = descendants(service.proc.pid)
        assert len(tree) >= 6, tree  # per engine: launcher, fake vLLM, its grandchild
        service.proc.send_signal(signal.SIGKILL)
        service.proc.wait()
        killed = time.monotonic()
        while any(alive(p) for p in tree):
            left = [p for p in tree if alive(p)]
            assert time.monotonic() - killed < 5, f"vLLM processes outlived tide-vllm: {left}"
            time.sleep(0.05)
    finally:
        service.kill_all()


def test_a_second_start_of_a_fleet_names_every_engine_and_harms_nothing(tmp_path):
    config = fake_fleet_config({"a": "grandchild", "b": "grandchild"}, pid_dir=tmp_path)
    first = ServiceProcess(config, tmp_path / "first")
    try:
        first.wait_healthy(timeout=30)
        deadline = time.monotonic() + 20
        while not all((tmp_path / f"{n}.pid").exists() for n in "ab"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        tree = descendants(first.proc.pid)
        second = ServiceProcess(config, tmp_path / "second")
        try:
            assert second.proc.wait(timeout=30) == 1
            log = second.log()
            assert f"running tide-vllm pid {first.proc.pid}" in log
            for i, engine in enumerate(config["engines"]):
                assert f"engines[{i}].port {engine['port']}" in log
            assert f"web.bind_address.port {config['web']['bind_address']['port']}" in log
            assert "starting vLLM" not in log and "stopping vLLM process group" not in log
        finally:
            second.kill_all()
        assert all(alive(p) for p in tree), "the first instance's processes were touched"
    finally:
        first.kill_all()
