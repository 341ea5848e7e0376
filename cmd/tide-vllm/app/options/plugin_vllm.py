"""Wires the engines: builds a monitor for each engine of the configuration's fleet (the
supervisor of an auto-started one, the probe of an external one), starts them together, hands
them to the context, and stops them. The supervisor itself is infrastructure
(tide_vllm.infrastructure.vllm.supervisor and .fleet)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tide_vllm.domain.chat.entity import EngineState, EngineStatus
from tide_vllm.infrastructure.vllm.fleet import ExternalEngine, Fleet, ModelMonitor
from tide_vllm.infrastructure.vllm.supervisor import (
    StaticMonitor,
    VLLMServerManager,
    VLLMStartError,
    new_upstream_key,
)

from .options import Config, EngineConfig, check_model_path

__all__ = ["VLLMPlugin", "VLLMStartError"]

log = logging.getLogger("tide_vllm.supervisor")


class VLLMPlugin:
    """Auto-started engines are started and supervised; external ones are probed; disabled
    ones answer 503. The context gets every engine's monitor and effective settings
    (`ctx.engines`, `ctx.engine_configs`), which the web layer routes across. An entry that
    discovers its engines (`discover:`) has no address of its own: the web layer finds,
    probes and routes to its engines, so it is left out here."""

    name = "vllm"

    def __init__(self) -> None:
        self.fleet: Fleet | None = None

    async def start(self, ctx: Any) -> None:
        config: Config = ctx.config
        fleet = config.fleet()
        named = config.engines is not None  # a fleet's lines name their engine
        for engine in fleet:
            if engine.enabled and engine.auto_start:
                check_model_path(engine, ctx.config_path)
        # A fresh random key for the vLLMs we start (unless the configuration gives one): with
        # it, their ports, even reachable on the network, cannot be used to go around
        # tide-vllm's own API keys. Each engine's config carries the key to send it.
        key = new_upstream_key()
        monitors: dict[str, ModelMonitor] = {}
        configs: dict[str, EngineConfig] = {}
        for engine in fleet:
            name = engine.name if named else None
            monitor: ModelMonitor
            if not engine.enabled:
                status = EngineStatus(
                    EngineState.DISABLED,
                    False,
                    f"vLLM is disabled ({engine.config_key}.enabled: false)",
                )
                monitor = StaticMonitor(status, engine.model_name)
            elif engine.discovered_at is not None:
                log.info(
                    "engines %s: one per address of %s, found by the web layer every 10 s",
                    engine.name, engine.discover,
                )  # fmt: skip
                continue
            elif engine.auto_start:
                engine = engine.model_copy(update={"api_key": engine.api_key or key})
                monitor = VLLMServerManager(engine, on_fatal=_fatal(ctx, name), name=name)
            else:
                where = f"engine {name}" if name else "manual mode"
                log.info("%s: using the vLLM server at %s", where, engine.base_url)
                monitor = ExternalEngine(engine, name=name)
            monitors[engine.name] = monitor
            configs[engine.name] = engine
        self.fleet = Fleet(monitors, web_port=config.web.bind_address.port)
        await self.fleet.start()
        ctx.engines, ctx.engine_configs = monitors, configs

        if not named:
            first = configs[fleet[0].name]
            if first.enabled:
                ctx.upstream_api_key = first.api_key if first.auto_start else None

    async def stop(self, ctx: Any) -> None:
        if self.fleet is not None:
            await self.fleet.stop(grace=1.0 if ctx.force else None)


def _fatal(ctx: Any, name: str | None) -> Callable[[str], None]:
    """An engine whose first start failed stops tide-vllm (exit 1), as the single engine
    does: its configuration is wrong, and the operator learns it at once."""
    prefix = f"engine {name}: " if name else ""
    return lambda reason: ctx.fail(prefix + reason)
