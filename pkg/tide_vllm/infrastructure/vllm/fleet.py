"""The fleet: every engine tide-vllm serves from, started and stopped together.

An auto-started engine is a VLLMServerManager (its own process group, launcher, port, env,
restarts and loggers); an external one is an ExternalEngine, probed every `health_interval`;
a disabled one is a StaticMonitor. Each is an EngineMonitor that also names its model, and a
model is ready when one of its engines is (`models_ready`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Protocol

from tide_vllm.domain.chat.entity import EngineStatus
from tide_vllm.domain.chat.repository import EngineMonitor
from tide_vllm.infrastructure.vllm.supervisor import (
    PROBE_TIMEOUT,
    EngineSpec,
    VLLMServerManager,
    check_installed,
    reclaim_or_refuse_port,
    refuse_if_taken,
)
from tide_vllm.infrastructure.vllm.vllm_client import VLLMClient
from tide_vllm.infrastructure.vllm.vllm_repository import VLLMEngineProbe


class ModelMonitor(EngineMonitor, Protocol):
    """An EngineMonitor that also names the model its engine serves."""

    @property
    def model_name(self) -> str: ...


def models_ready(engines: Mapping[str, ModelMonitor]) -> dict[str, bool]:
    """Each model of the fleet, once, and whether one of its engines is ready (as last seen:
    cheap, for every request)."""
    ready: dict[str, bool] = {}
    for monitor in engines.values():
        model = monitor.model_name
        ready[model] = ready.get(model, False) or monitor.current().healthy
    return ready


async def check_models(engines: Mapping[str, ModelMonitor]) -> dict[str, bool]:
    """As `models_ready`, from a fresh status of every engine, asked at once (for /health)."""
    monitors = list(engines.values())
    statuses = await asyncio.gather(*(monitor.check() for monitor in monitors))
    ready: dict[str, bool] = {}
    for monitor, status in zip(monitors, statuses, strict=True):
        ready[monitor.model_name] = ready.get(monitor.model_name, False) or status.healthy
    return ready


class ExternalEngine:
    """The EngineMonitor of an engine tide-vllm does not start (`auto_start: false`): asks it
    every `health_interval` whether it serves its model (GET /v1/models), and on `check()`."""

    def __init__(self, config: EngineSpec, *, name: str | None = None) -> None:
        self.config = config
        self.name = name
        self.log = logging.getLogger("tide_vllm.fleet" + (f".{name}" if name else ""))
        self._client = VLLMClient(
            config.base_url, timeout=PROBE_TIMEOUT, api_key=config.api_key, pool_size=2
        )
        self._probe = VLLMEngineProbe(self._client, config.model_name, PROBE_TIMEOUT)
        self._task: asyncio.Task[None] | None = None
        self._healthy: bool | None = None  # as last logged

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def current(self) -> EngineStatus:
        return self._probe.current()

    async def check(self) -> EngineStatus:
        status = await self._probe.check()
        self._report(status)
        return status

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="probe")

    async def stop(self, grace: float | None = None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.aclose()

    async def _poll(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.config.health_interval)

    def _report(self, status: EngineStatus) -> None:
        if status.healthy is self._healthy:
            return
        self._healthy = status.healthy
        where = f"the vLLM server at {self.config.base_url}"
        if status.healthy:
            self.log.info("%s serves %s", where, self.config.model_name)
        else:
            self.log.warning("%s is not ready: %s", where, status.detail)


class Fleet:
    """Starts and stops the engines together: the checks that a second start harms nothing
    are made for every auto-started engine before any is launched; the engines are launched
    at once and become ready in parallel (each in the background); they are stopped at once.
    """

    def __init__(self, engines: Mapping[str, ModelMonitor], web_port: int | None = None) -> None:
        self.engines = dict(engines)
        self.web_port = web_port

    @property
    def managers(self) -> list[VLLMServerManager]:
        return [e for e in self.engines.values() if isinstance(e, VLLMServerManager)]

    @property
    def external(self) -> list[ExternalEngine]:
        return [e for e in self.engines.values() if isinstance(e, ExternalEngine)]

    async def start(self) -> None:
        """Raises VLLMStartError, having stopped whatever it launched, when an engine cannot
        be launched at all."""
        managers = self.managers
        try:
            for manager in managers:
                check_installed(manager.config)
            refuse_if_taken([m.config for m in managers], self.web_port)
            for manager in managers:
                reclaim_or_refuse_port(manager.config, manager.log)
            launches = await asyncio.gather(*(m.launch() for m in managers), return_exceptions=True)
            for result in launches:
                if isinstance(result, BaseException):
                    raise result
        except BaseException:
            await self.stop(grace=1.0)
            raise
        for engine in self.external:
            engine.start()

    async def wait_ready(self) -> None:
        """Until every auto-started engine's first start succeeded; raises VLLMStartError for
        the first that failed."""
        await asyncio.gather(*(m.wait_ready() for m in self.managers))

    async def stop(self, grace: float | None = None) -> None:
        """Every engine at once; returns when no process of any group is left."""
        results = await asyncio.gather(
            *(m.stop(grace) for m in self.managers),
            *(e.stop(grace) for e in self.external),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]
