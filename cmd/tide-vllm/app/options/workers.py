"""Several web workers on one port, with exactly one vLLM supervisor.

With `web.workers: N > 1` the main process keeps the supervisor (one vLLM, started and watched
once) and runs N web workers as child processes (spawned, so nothing of the main process's
event loop is inherited) that share one port. Each worker learns vLLM's state from
shared memory the supervisor writes on every change, so a worker answers 503 at once while vLLM
starts or restarts, like a single process does. A worker dies with the main process
(PR_SET_PDEATHSIG), so no worker outlives it.

Prometheus metrics are aggregated across workers with prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.context
import os
import shutil
import signal
import tempfile
from typing import Any

import orjson

from tide_vllm.domain.chat.entity import EngineState, EngineStatus

from .options import Config

log = logging.getLogger("tide_vllm.workers")

PR_SET_PDEATHSIG = 1
STATUS_BYTES = 4096
DRAINS_BYTES = 16384  # the names of the drained engines, one per line: hundreds of them


class SharedEngineState:
    """vLLM's status in shared memory: written by the supervisor, read by every worker."""

    def __init__(self, mp: multiprocessing.context.BaseContext) -> None:
        self.buffer = mp.Array("c", STATUS_BYTES, lock=False)  # type: ignore[attr-defined]
        self.version = mp.Value("Q", 0, lock=False)  # type: ignore[attr-defined]

    def publish(self, status: EngineStatus, total_restarts: int) -> None:
        record = {
            "state": status.state.value,
            "healthy": status.healthy,
            "detail": status.detail[:2000],
            "restarts": total_restarts,
        }
        self.buffer.value = orjson.dumps(record)[: STATUS_BYTES - 1]
        self.version.value += 1


class SharedMonitor:
    """EngineMonitor of a worker: the supervisor's last published status, parsed on change."""

    def __init__(self, shared: SharedEngineState) -> None:
        self.shared = shared
        self._seen = -1
        self._status = EngineStatus(EngineState.STARTING, False, "vLLM is starting")
        self.total_restarts = 0

    def current(self) -> EngineStatus:
        version = self.shared.version.value
        if version != self._seen:
            try:
                record = orjson.loads(self.shared.buffer.value)
                self._status = EngineStatus(
                    EngineState(record["state"]), bool(record["healthy"]), record["detail"]
                )
                self.total_restarts = int(record["restarts"])
                self._seen = version
            except (orjson.JSONDecodeError, KeyError, ValueError):
                pass  # caught mid-write: the next call reads it whole
        return self._status

    async def check(self) -> EngineStatus:
        return self.current()


def _publisher(shared: SharedEngineState, monitor: Any) -> Any:
    return lambda status: shared.publish(status, monitor.total_restarts)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SharedDrains:
    """The names of the engines operators drained (`POST /admin/engines/{name}/drain`), in
    shared memory: a drain asked of one worker holds in all of them, engines found by
    discovery included (every worker finds them under the same names).

    A seqlock: a writer (rare: an operator's call) takes the lock, makes the version odd,
    writes, makes it even; a reader (every request) parses the names again only when the
    version changed, and keeps what it read only if the version was even and unchanged."""

    def __init__(self, mp: multiprocessing.context.BaseContext) -> None:
        self.buffer = mp.Array("c", DRAINS_BYTES, lock=False)  # type: ignore[attr-defined]
        self.version = mp.Value("Q", 0, lock=False)  # type: ignore[attr-defined]
        self.lock = mp.Lock()
        self._seen = -1
        self._names: frozenset[str] = frozenset()

    def get(self, name: str) -> bool:
        version = self.version.value
        if version != self._seen and version % 2 == 0:
            names = frozenset(self.buffer.value.decode().split("\n")) - {""}
            if self.version.value == version:
                self._names, self._seen = names, version
        return name in self._names

    def set(self, name: str, draining: bool) -> None:
        with self.lock:
            names = set(self.buffer.value.decode().split("\n")) - {""}
            if draining:
                names.add(name)
            else:
                names.discard(name)
            text = "\n".join(sorted(names)).encode()
            if len(text) >= DRAINS_BYTES:
                raise ValueError("too many engines drained at once")
            self.version.value += 1
            self.buffer.value = text
            self.version.value += 1


def worker_main(
    config: Config,
    upstream_api_key: str | None,
    engines: dict[str, SharedEngineState | Any],
    engine_configs: dict[str, Any],
    drains: SharedDrains,
) -> None:
    """A web worker's process: the same app and server as a single process, on the same port
    (granian binds it with SO_REUSEPORT, and the kernel spreads connections over the workers).
    `engines` holds, by name, each supervised engine's shared state or a fixed monitor (a
    disabled engine); an engine missing from it is asked by the worker itself (an external
    one). SIGTERM drains it like a single process."""
    _die_with_parent()
    from .plugin_logs import configure_logging

    configure_logging(config.log.level, config.log.format)
    monitors = {
        name: SharedMonitor(engine) if isinstance(engine, SharedEngineState) else engine
        for name, engine in engines.items()
    }
    factory: Any = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve_worker(config, upstream_api_key, monitors, engine_configs, drains))


async def _serve_worker(
    config: Config,
    upstream_api_key: str | None,
    monitors: dict[str, Any],
    engine_configs: dict[str, Any],
    drains: SharedDrains,
) -> None:
    from .plugin_web_handler import (
        build_app_for,
        drain_and_stop,
        freeze_startup_objects,
        granian_server,
        serve_until_stopped,
    )

    app = build_app_for(config, monitors, upstream_api_key, engine_configs, drains=drains)
    server = granian_server(app, config.web)
    lifecycle = app.state.lifecycle
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the main process decides
    task = await serve_until_stopped(server, lifecycle, app.state.started)
    freeze_startup_objects()
    waiter = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not task.done():
        await drain_and_stop(server, task, lifecycle, config.web.shutdown_grace)


class WorkerPool:
    """Starts the workers, restarts one that dies, stops them all."""

    def __init__(
        self,
        config: Config,
        upstream_api_key: str | None,
        monitors: dict[str, Any],
        engine_configs: dict[str, Any],
    ) -> None:
        self.config = config
        self.upstream_api_key = upstream_api_key
        self.engine_configs = engine_configs
        self.mp = multiprocessing.get_context("spawn")
        # A supervised engine's status goes to the workers through shared memory; a fixed
        # monitor (a disabled engine) travels as it is; an external engine is asked by each
        # worker itself.
        self.engines: dict[str, Any] = {}
        for name, monitor in monitors.items():
            if hasattr(monitor, "on_change"):
                shared = self.engines[name] = SharedEngineState(self.mp)
                monitor.on_change = _publisher(shared, monitor)
                monitor.on_change(monitor.current())
            elif not hasattr(monitor, "start"):
                self.engines[name] = monitor
        self.drains = SharedDrains(self.mp)
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.stopping = False
        self._watch: asyncio.Task[None] | None = None
        # Metrics of all workers, aggregated at scrape time.
        self.metrics_dir = tempfile.mkdtemp(prefix="tide-vllm-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir

    def start(self) -> None:
        bind = self.config.web.bind_address
        for _ in range(self.config.web.workers):
            self.processes.append(self._spawn())
        self._watch = asyncio.get_running_loop().create_task(self._keep_alive())
        log.info("%d web workers on http://%s:%d", len(self.processes), bind.host, bind.port)

    def _spawn(self) -> multiprocessing.process.BaseProcess:
        process = self.mp.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(
                self.config,
                self.upstream_api_key,
                self.engines,
                self.engine_configs,
                self.drains,
            ),
            name="tide-vllm-web",
        )
        process.start()
        return process

    async def _keep_alive(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.5)
            for i, process in enumerate(self.processes):
                if not process.is_alive() and not self.stopping:
                    log.error("web worker %d exited with %s; starting another", i, process.exitcode)
                    self.processes[i] = self._spawn()

    async def stop(self, force: bool, grace: float) -> None:
        self.stopping = True
        if self._watch:
            self._watch.cancel()
        sig = signal.SIGKILL if force else signal.SIGTERM
        for process in self.processes:
            if process.pid and process.is_alive():
                os.kill(process.pid, sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace + 5
        while any(p.is_alive() for p in self.processes) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for process in self.processes:
            if process.is_alive():
                log.warning("web worker %s did not stop; killing it", process.pid)
                process.kill()
            process.join(1)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
