"""Engines found by name (`discover: dns://NAME:PORT` on an entry of `engines:`): one engine per
address NAME resolves to, looked up again every `interval`.

A new address becomes an engine, named after its entry and its address, and joins the fleet
once it has been asked whether it serves; an address gone takes its engine out of the fleet
(no new request; those in flight finish, then its client is released). A name that resolves
to nothing leaves its model with no engine from it (a 503 saying so) and is asked again; a
lookup that fails (no DNS answer) leaves the engines as they were. Each web worker looks up on
its own."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .engines import Engines, Upstream

log = logging.getLogger("tide_vllm.discovery")

INTERVAL = 10.0  # seconds between lookups
NAME_LIMIT = 32  # an engine name's length at most (a-z, 0-9, - and _)

_NOT_IN_NAME = re.compile(r"[^a-z0-9_-]")


class Resolver(Protocol):
    """The addresses `host` resolves to, sorted; [] when none. Raises OSError when it could
    not tell (tide_vllm.infrastructure.vllm.discovery.resolve)."""

    def __call__(self, host: str, port: int) -> Awaitable[list[str]]: ...


@dataclass(frozen=True)
class Pool:
    """One entry of `engines:` with `discover:`: its name, its model, what is looked up."""

    name: str
    model: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"dns://{url_host(self.host)}:{self.port}"


def url_host(host: str) -> str:
    """`host` as a URL holds it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def engine_name(pool: str, address: str) -> str:
    """`<pool>-<address>` in the characters of an engine name (10.0.0.5 in pool `pool`:
    pool-10-0-0-5). Past 32 characters, its first 23 and 8 hex digits of a hash of both: the
    same in every process and every run."""
    name = f"{pool}-{_NOT_IN_NAME.sub('-', address.lower())}"
    if len(name) <= NAME_LIMIT:
        return name
    digest = hashlib.sha256(f"{pool}/{address}".encode()).hexdigest()[:8]
    return f"{name[: NAME_LIMIT - 9]}-{digest}"


class Discovery:
    """Keeps each pool's engines in `engines` as its name resolves. `build` makes the engine of
    an address (its client, its monitor); `release` frees what `build` made, once the engine
    has left the fleet and its requests have ended."""

    def __init__(
        self,
        engines: Engines,
        pools: Sequence[Pool],
        resolver: Resolver,
        build: Callable[[Pool, str, str], Upstream],
        release: Callable[[Upstream], Awaitable[None]],
        *,
        interval: float = INTERVAL,
    ) -> None:
        self.engines = engines
        self.pools = tuple(pools)
        self.interval = interval
        self._resolver = resolver
        self._build = build
        self._release = release
        self._found: dict[str, dict[str, str]] = {p.name: {} for p in self.pools}
        self._trouble: dict[str, str] = {}  # pool -> what was last logged of a failure
        self._clashes: set[str] = set()
        self._leaving: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def found(self, pool: str) -> dict[str, str]:
        """The pool's engines now, name -> address."""
        return dict(self._found[pool])

    async def run(self) -> None:
        """Looks up every `interval`, for the app's life (the first look is a `refresh()`
        awaited at start-up)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:  # a bug in one look must not end discovery for good
                log.exception("discovery failed; trying again in %gs", self.interval)

    async def refresh(self) -> None:
        """Every pool's name, looked up once (all at once), and its engines made to match."""
        async with self._lock:
            looked = await asyncio.gather(*(self._lookup(p) for p in self.pools))
            joining: list[tuple[Pool, str, Upstream]] = []
            for pool, addresses in zip(self.pools, looked, strict=True):
                if addresses is not None:
                    joining += self._update(pool, addresses)
            # Asked before they join, so that each joins in its true state.
            checks = (upstream.monitor.check() for _, _, upstream in joining)
            await asyncio.gather(*checks, return_exceptions=True)
            for pool, address, upstream in joining:
                self.engines.add(upstream)
                self._found[pool.name][upstream.name] = address
                log.info("engine %s found at %s (%s)", upstream.name, address, pool.url)

    async def aclose(self) -> None:
        """Stop waiting for the engines that left: what they hold is the caller's to free."""
        for task in self._leaving:
            task.cancel()
        await asyncio.gather(*self._leaving, return_exceptions=True)

    async def _lookup(self, pool: Pool) -> list[str] | None:
        try:
            addresses = await self._resolver(pool.host, pool.port)
        except OSError as exc:
            self._warn(
                pool,
                f"cannot look up {pool.url} ({exc.strerror or exc}); its "
                f"{len(self._found[pool.name])} engine(s) are kept as they are, and it is "
                f"asked again in {self.interval:g}s",
            )
            return None
        if not addresses:
            self._warn(
                pool,
                f"{pool.url} resolves to no address: model {pool.model} has no engine from "
                f"it until it does (asked again every {self.interval:g}s)",
            )
        elif self._trouble.pop(pool.name, None) is not None:
            log.info("engines %s: %s resolves to %s", pool.name, pool.url, ", ".join(addresses))
        return addresses

    def _warn(self, pool: Pool, message: str) -> None:
        """Once, until the trouble changes or passes: not every few seconds."""
        if self._trouble.get(pool.name) != message:
            self._trouble[pool.name] = message
            log.warning("engines %s: %s", pool.name, message)

    def _update(self, pool: Pool, addresses: list[str]) -> list[tuple[Pool, str, Upstream]]:
        """Takes out the engines of addresses gone; builds those of new ones, to add."""
        found = self._found[pool.name]
        wanted = {engine_name(pool.name, a): a for a in addresses}
        for name in [n for n in found if n not in wanted]:
            address = found.pop(name)
            upstream = self.engines.remove(name)
            log.info("engine %s left: %s is no longer an address of %s", name, address, pool.url)
            task = asyncio.get_running_loop().create_task(self._retire(upstream))
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)
        joining = []
        for name, address in wanted.items():
            if name in found:
                continue
            if name in self.engines.upstreams:
                if name not in self._clashes:
                    self._clashes.add(name)
                    log.error(
                        "engines %s: %s (at %s) is not added: an engine of that name exists",
                        pool.name, name, address,
                    )  # fmt: skip
                continue
            self._clashes.discard(name)
            joining.append((pool, address, self._build(pool, name, address)))
        return joining

    async def _retire(self, upstream: Upstream) -> None:
        await self.engines.drained(upstream)
        await self._release(upstream)
