"""Streaming load with an asyncio client (aiohttp): time to first token, per-chunk delivery
latency and many concurrent streams.

The stub writes its `time.monotonic_ns()` as the text of each content chunk; this client reads
the clock again when the event arrives (CLOCK_MONOTONIC is one clock for every process on the
machine), so each chunk's delivery latency is measured end to end, whatever sits in between.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

JSON_HEADERS = {"Content-Type": "application/json"}


class StreamError(Exception):
    pass


@dataclass
class StreamSample:
    """One stream as the client saw it (times in ns since the request was sent)."""

    ttft_ns: int = 0  # first content event
    total_ns: int = 0  # `data: [DONE]`
    chunks: int = 0
    chunk_latency_ns: list[int] = field(default_factory=list)  # stub write → client read


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(pct / 100 * len(ordered))))
    return float(ordered[rank - 1])


def event_text(payload: bytes) -> str:
    """The text of one event, OpenAI chunk or Tide event; raises StreamError on an error."""
    event: dict[str, Any] = orjson.loads(payload)
    if event.get("error"):
        raise StreamError(f"error event: {event['error']}")
    if "choices" in event:
        choices = event["choices"]
        return (choices[0].get("delta") or {}).get("content") or "" if choices else ""
    return str(event.get("content") or "")


async def read_stream(session: aiohttp.ClientSession, url: str, body: bytes) -> StreamSample:
    """Send one streaming request and read it to the end."""
    sample = StreamSample()
    done = False
    start = time.monotonic_ns()
    async with session.post(url, data=body, headers=JSON_HEADERS) as response:
        if response.status != 200:
            raise StreamError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        async for line in response.content:
            now = time.monotonic_ns()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                sample.total_ns = now - start
                done = True
                continue
            text = event_text(payload).strip()
            if not text:
                continue
            sample.chunks += 1
            if sample.chunks == 1:
                sample.ttft_ns = now - start
            if text.isdigit():
                sample.chunk_latency_ns.append(now - int(text))
    if not done:
        raise StreamError("stream ended without data: [DONE]")
    return sample


def new_session(limit: int = 0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=300, sock_connect=30, sock_read=60)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


@dataclass
class SequentialResult:
    streams: int
    ttft_ms: list[float]
    total_ms: list[float]
    chunk_ms: list[float]


async def interleaved_streams(
    targets: dict[str, tuple[str, bytes]], seconds: float, block: int = 25, warmup: int = 20
) -> dict[str, SequentialResult]:
    """One stream after another to each target (each on one connection of its own, after
    `warmup` streams), the targets taking turns `block` streams at a time, for `seconds` per
    target in all: a machine whose speed drifts during the run (other work, a noisy
    neighbour) slows every target alike, instead of whichever ran in the slow stretch. The
    first stream of each turn is not counted: it finds its servers idle since the last turn,
    which a stream among others does not."""
    samples = {name: SequentialResult(0, [], [], []) for name in targets}
    sessions = {name: new_session(limit=1) for name in targets}
    try:
        for name, (url, body) in targets.items():
            for _ in range(warmup):
                await read_stream(sessions[name], url, body)
        deadline = time.monotonic() + seconds * len(targets)
        while time.monotonic() < deadline:
            for name, (url, body) in targets.items():
                result = samples[name]
                for i in range(block + 1):
                    sample = await read_stream(sessions[name], url, body)
                    if i == 0:
                        continue
                    result.streams += 1
                    result.ttft_ms.append(sample.ttft_ns / 1e6)
                    result.total_ms.append(sample.total_ns / 1e6)
                    result.chunk_ms.extend(ns / 1e6 for ns in sample.chunk_latency_ns)
    finally:
        for session in sessions.values():
            await session.close()
    return samples


@dataclass
class ConcurrentResult:
    clients: int
    ok: int
    errors: int
    seconds: float
    chunks: int
    ttft_ms: list[float]
    total_ms: list[float]
    first_errors: list[str]


async def concurrent_streams(
    url: str, body: bytes, clients: int, expected_chunks: int
) -> ConcurrentResult:
    """`clients` streams at once, each on its own connection; a stream with a wrong number of
    content chunks counts as an error."""
    async with new_session(limit=0) as session:

        async def one() -> StreamSample:
            sample = await read_stream(session, url, body)
            if sample.chunks != expected_chunks:
                raise StreamError(f"{sample.chunks} content chunks, expected {expected_chunks}")
            return sample

        start = time.monotonic()
        results = await asyncio.gather(*(one() for _ in range(clients)), return_exceptions=True)
        seconds = time.monotonic() - start
    samples = [r for r in results if isinstance(r, StreamSample)]
    failures = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return ConcurrentResult(
        clients=clients,
        ok=len(samples),
        errors=len(failures),
        seconds=seconds,
        chunks=sum(s.chunks for s in samples),
        ttft_ms=[s.ttft_ns / 1e6 for s in samples],
        total_ms=[s.total_ns / 1e6 for s in samples],
        first_errors=sorted(set(failures))[:5],
    )


async def set_chunk_delay(stub_url: str, seconds: float) -> None:
    async with aiohttp.ClientSession() as session:
        body = orjson.dumps({"chunk_delay": seconds})
        async with session.post(stub_url + "/_bench/config", data=body) as response:
            response.raise_for_status()


async def post_json(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers=JSON_HEADERS) as response:
            return response.status, orjson.loads(await response.read())
