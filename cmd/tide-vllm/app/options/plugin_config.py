"""Loads and validates the configuration; the first plugin."""

from __future__ import annotations

from typing import Any

from .options import load_config


class ConfigPlugin:
    name = "config"

    async def start(self, ctx: Any) -> None:
        ctx.config = load_config(ctx.config_path)

    async def stop(self, ctx: Any) -> None:
        return None
