"""Bootstrap: runs the plugins in order, serves until told to stop, stops them in reverse."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tide_vllm.infrastructure.vllm.fleet import ModelMonitor

from .options.options import Config, ConfigError, EngineConfig
from .options.plugin_config import ConfigPlugin
from .options.plugin_logs import LogsPlugin
from .options.plugin_vllm import VLLMPlugin, VLLMStartError
from .options.plugin_web_handler import WebHandlerPlugin

log = logging.getLogger("tide_vllm")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


class Plugin(Protocol):
    name: str

    async def start(self, ctx: Context) -> None: ...

    async def stop(self, ctx: Context) -> None: ...


@dataclass
class Context:
    """What the plugins share while the service runs."""

    config_path: Path
    config: Config = field(default_factory=Config)
    # Every engine by name (tide_vllm.infrastructure.vllm.fleet: models_ready(engines)), and
    # its effective settings (vllm: overlaid with its entry; api_key: the key to send it).
    engines: dict[str, ModelMonitor] = field(default_factory=dict)
    engine_configs: dict[str, EngineConfig] = field(default_factory=dict)
    upstream_api_key: str | None = None  # the key tide-vllm gave the vLLM it started
    exit_code: int = EXIT_OK
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    force: bool = False  # a second SIGINT: stop now, without waiting for requests

    def request_shutdown(self) -> None:
        self.stopping.set()

    def fail(self, reason: str) -> None:
        """A fatal failure (vLLM could not start): stop everything, exit non-zero."""
        log.error("stopping tide-vllm: %s", reason)
        self.exit_code = EXIT_FAILURE
        self.stopping.set()


def default_plugins() -> list[Plugin]:
    return [ConfigPlugin(), LogsPlugin(), VLLMPlugin(), WebHandlerPlugin()]


async def serve(config_path: Path, plugins: list[Plugin] | None = None) -> int:
    ctx = Context(config_path)
    started: list[Plugin] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, ctx, sig)
    try:
        for plugin in plugins or default_plugins():
            await plugin.start(ctx)
            started.append(plugin)
        await ctx.stopping.wait()
    except ConfigError as exc:
        print(f"tide-vllm: config error: {exc}", file=sys.stderr)
        ctx.exit_code = EXIT_CONFIG
    except (VLLMStartError, RuntimeError) as exc:
        log.error("%s", exc)
        print(f"tide-vllm: {exc}", file=sys.stderr)
        ctx.exit_code = EXIT_FAILURE
    finally:
        for plugin in reversed(started):
            try:
                await plugin.stop(ctx)
            except Exception:
                log.exception("error while stopping %s", plugin.name)
                ctx.exit_code = ctx.exit_code or EXIT_FAILURE
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("tide-vllm stopped (exit code %d)", ctx.exit_code)
    return ctx.exit_code


def _on_signal(ctx: Context, sig: signal.Signals) -> None:
    if ctx.stopping.is_set():
        if sig == signal.SIGINT:
            log.warning("second SIGINT: stopping at once")
            ctx.force = True
        return
    again = " (Ctrl-C again: stop at once)" if sig == signal.SIGINT else ""
    log.info("received %s: shutting down%s", sig.name, again)
    ctx.request_shutdown()


def run(config_path: str | Path) -> int:
    """Serve until SIGTERM/SIGINT; the process's exit code."""
    factory: Any = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(Path(config_path)))
