"""Reads an engine's KV-cache events: vLLM's ZeroMQ publisher (`--kv-events-config`), as the
domain's events (tide_vllm.domain.fleet.kv_events).

vLLM sends each batch as three frames: the topic, a sequence number (8 bytes, big-endian) and
the batch in msgpack, `[ts, [event, ...], data_parallel_rank]`, each event a map whose `type`
names it (BlockStored, BlockRemoved, AllBlocksCleared). The decoding here reads those maps by
name, so that fields vLLM adds later are ignored rather than fatal; an event of a kind not
known here is skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from tide_vllm.domain.fleet.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheEvent,
)

log = logging.getLogger("tide_vllm.routing")

# The device's cache is the one a request reuses at once; blocks offloaded to another medium
# (CPU memory, storage) are left to that tier.
DEVICE_MEDIA = (None, "GPU")

_decoder = msgspec.msgpack.Decoder()

# The tcp hosts of an endpoint bound on every interface, which a reader reaches at the
# engine's own address.
EVERY_INTERFACE = ("*", "::", "0.0.0.0", "")


def read_endpoints(endpoint: str, host: str, ranks: int = 1) -> tuple[str, ...]:
    """Where to read an engine that publishes on `endpoint` (ipc://PATH or tcp://HOST:PORT):
    an ipc:// one where it is; a tcp one bound on every interface at the engine's `host`; one
    port a data-parallel rank, counted from the endpoint's (vLLM offsets it by the rank)."""
    if endpoint.startswith("ipc://"):
        return (endpoint,)
    address, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    address = address.strip("[]")
    if address in EVERY_INTERFACE:
        address = host
    if ":" in address:
        address = f"[{address}]"
    return tuple(f"tcp://{address}:{int(port) + rank}" for rank in range(ranks))


def decode_batch(payload: bytes) -> tuple[int, list[CacheEvent]]:
    """The data-parallel rank and the events of one published batch; ValueError if it is not
    one."""
    try:
        batch = _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not msgpack: {exc}") from None
    if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("not an event batch [ts, events, ...]")
    events: list[CacheEvent] = []
    for raw in batch[1]:
        event = _event(raw) if isinstance(raw, dict) else None
        if event is not None:
            events.append(event)
    rank = batch[2] if len(batch) > 2 and isinstance(batch[2], int) else 0
    return rank, events


def _event(raw: dict[str, Any]) -> CacheEvent | None:
    kind = raw.get("type")
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    if raw.get("medium") not in DEVICE_MEDIA or raw.get("group_idx") not in (None, 0):
        return None
    hashes = raw.get("block_hashes")
    if not isinstance(hashes, list):
        return None
    if kind == "BlockRemoved":
        return BlockRemoved(tuple(_hashable(h) for h in hashes))
    if kind != "BlockStored":
        return None
    tokens = raw.get("token_ids")
    size = raw.get("block_size")
    if not isinstance(tokens, list) or not isinstance(size, int):
        return None
    extra = raw.get("extra_keys")
    parent = raw.get("parent_block_hash")
    return BlockStored(
        hashes=tuple(_hashable(h) for h in hashes),
        parent=None if parent is None else _hashable(parent),
        token_ids=tuple(tokens),
        block_size=size,
        lora_name=raw.get("lora_name"),
        extra_keys=tuple(_hashable(e) for e in extra) if isinstance(extra, list) else None,
    )


def _hashable(value: Any) -> Hashable:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    return value  # type: ignore[no-any-return]


class KVEventsReader:
    """Follows one engine's events until cancelled: subscribes to its endpoints (one per
    data-parallel rank), hands each batch's events to `apply(engine, events)`, and calls
    `restarted(engine)` when the sequence starts again (a new vLLM process: its cache is
    empty). ZeroMQ connects, and reconnects, by itself: an engine that is not up yet, or
    restarts, is simply read once it publishes. Batches lost to a gap are counted."""

    def __init__(
        self,
        engine: str,
        endpoints: Sequence[str],
        apply: Callable[[str, Iterable[CacheEvent]], None],
        restarted: Callable[[str], None],
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.engine = engine
        self.endpoints = tuple(endpoints)
        self._apply = apply
        self._restarted = restarted
        self._context = context or zmq.asyncio.Context.instance()
        self.batches = 0
        self.lost = 0  # batches missed (a gap in the sequence)
        self.unreadable = 0

    async def run(self) -> None:
        socket = self._context.socket(zmq.SUB)
        try:
            socket.setsockopt(zmq.SUBSCRIBE, b"")
            socket.setsockopt(zmq.RCVHWM, 100_000)
            socket.setsockopt(zmq.LINGER, 0)
            if any(e.startswith("tcp://[") for e in self.endpoints):
                socket.setsockopt(zmq.IPV6, 1)
            for endpoint in self.endpoints:
                socket.connect(endpoint)
            log.info("engine %s: following its KV-cache events at %s", self.engine,
                     ", ".join(self.endpoints))  # fmt: skip
            last: dict[int, int] = {}  # per rank: a publisher's sequence is its own
            while True:
                frames = await socket.recv_multipart()
                self._read(frames, last)
        finally:
            socket.close(linger=0)

    def _read(self, frames: list[bytes], last: dict[int, int]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.unreadable += 1
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        try:
            rank, events = decode_batch(frames[2])
        except ValueError as exc:
            self.unreadable += 1
            log.debug("engine %s: a KV-cache event batch not read: %s", self.engine, exc)
            return
        previous = last.get(rank)
        if previous is not None and seq <= previous:
            # A new vLLM process: every rank's sequence starts again, and the engine's cache
            # is empty once, not once a rank.
            last.clear()
            self._restarted(self.engine)
        elif previous is not None and seq > previous + 1:
            self.lost += seq - previous - 1
            log.debug("engine %s: %d KV-cache event batches lost", self.engine,
                      seq - previous - 1)  # fmt: skip
        last[rank] = seq
        self.batches += 1
        if events:
            self._apply(self.engine, events)


class KVEventsReaders:
    """The readers of every engine that publishes, each a task; started and stopped as
    engines come and go (discovery), all stopped by `aclose`."""

    def __init__(
        self,
        apply: Callable[[str, Iterable[CacheEvent]], None],
        restarted: Callable[[str], None],
    ) -> None:
        self._apply = apply
        self._restarted = restarted
        self._context = zmq.asyncio.Context()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.readers: dict[str, KVEventsReader] = {}

    def follow(self, engine: str, endpoints: Sequence[str]) -> None:
        if not endpoints or engine in self._tasks:
            return
        reader = KVEventsReader(engine, endpoints, self._apply, self._restarted, self._context)
        self.readers[engine] = reader
        self._tasks[engine] = asyncio.get_running_loop().create_task(
            reader.run(), name=f"kv-events-{engine}"
        )

    async def unfollow(self, engine: str) -> None:
        self.readers.pop(engine, None)
        task = self._tasks.pop(engine, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def aclose(self) -> None:
        for engine in list(self._tasks):
            await self.unfollow(engine)
        self._context.term()
