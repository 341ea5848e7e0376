"""tide-vllm's benchmark (`make bench`): what the gateway adds in front of an upstream.

It starts its own fast OpenAI-compatible stub upstream (bench/stub_upstream.py, ~0.05-0.1 ms a
request, tens of thousands of requests/s on one core) and tide-vllm itself, in manual mode in
front of it, as separate processes; then it measures each figure straight to the stub ("direct")
and through tide-vllm, side by side:

- latency p50/p99 at 1 connection, non-streaming, OpenAI shape (`/v1/chat/completions`) and the
  Tide shape (`{"prompt": …}` to `/chat/completions`, compared with the direct OpenAI call) —
  with `wrk`, once with every process on one core (no cross-core wake-ups: on this kind of VM a
  wake-up on another core costs ~0.05 ms per hop, which is the machine's, not the gateway's) and
  once unpinned (what the scheduler does by itself);
- throughput (req/s) and p99 at 32 and 256 connections, both shapes — with `wrk`, the measured
  server alone on its core (tide-vllm on one, the stub and the load generator on the other);
- streaming (64 chunks): time to first content event, and each chunk's delivery latency
  (the stub writes its CLOCK_MONOTONIC time into the chunk; the client reads the clock when the
  event arrives) with chunks 1 ms apart; and the whole stream's time when the stub sends the 64
  chunks back to back — with an aiohttp client, one stream after another on one connection,
  direct and through tide-vllm taking turns 25 streams at a time (so the machine's drift during
  the run falls on both alike);
- 1,000 concurrent streams (64 chunks, 20 ms apart): errors, time, and tide-vllm's peak
  resident memory (VmRSS of its process, sampled every 20 ms);
- for comparison, in the same run and in front of the same stub, other servers in tide-vllm's
  place, OpenAI shape, non-streaming, with the loads and placement above (1 connection on one
  core; 32 and 256 connections with the server alone on its core): phase `reference`, the
  20-line FastAPI pass-through of FIELD-NOTES (bench/reference_passthrough.py), and phase
  `litellm`, a LiteLLM proxy with one worker (bench/litellm_proxy.py), and phase `vllm_router`,
  the vLLM project's Rust router (PyPI `vllm-router`, bench/vllm_router.py) with the stub as its
  one worker URL and policy round_robin (with one upstream the policy does not matter), both
  also streaming, one stream at a time: time to first token and the whole 64-chunk stream; and
  phase `floor`, those streams only, through a relay that copies bytes and parses nothing
  (bench/minimal_relay.py): what one more process in the path costs here, whatever it does, and
  through a relay that parses HTTP and the request's JSON with no framework
  (bench/minimal_http_relay.py): what HTTP itself costs in Python here. Neither LiteLLM nor
  vllm-router is one of tide-vllm's dependencies: each phase installs a pinned release into a
  venv of its own, bench/.venv-litellm (about a minute) and bench/.venv-router (about 15 s), on
  first use, and is skipped, with one line, when that fails (no network). Their rows are named
  after them ("…, LiteLLM proxy", "…, vllm-router").

Each phase gets a fresh tide-vllm (no phase inherits another's connection pool or backlog);
each run is warmed up first, and starts only once the servers have finished the requests the
previous run's clients abandoned. Before each phase the machine's CPU use without us is taken:
other work (a test suite, a vLLM) makes the figures noisy, and the output says so. The results
are printed as a table, then the budgets of issue 15, each met / NOT met with its figure (added
p50 at 1 connection ≤ 1 ms; ≥ 3,000 req/s at 32 connections, one worker, p99 ≤ 25 ms; time to
first token added ≤ 1 ms; 1,000 concurrent streams, 0 errors; a budget whose phase did not run
is "not checked"; the fifth, on the real engine within 3 % of direct, is bench/real_vllm.py's),
and written, with the machine's description, to bench/results/latest.json (each phase's raw
figures under `raw`, e.g. raw["litellm"], the budgets under `budgets`;
`python bench/bench_report.py [FILE]` prints a results file's budgets again); the servers' logs
go to bench/results/logs/. `--workers N` adds the throughput rows for
`web.workers: N`; `--real` compares a real vLLM with tide-vllm in front of it instead
(bench/real_vllm.py).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from bench_proc import (
    REPO,
    ConfigRejected,
    RssSampler,
    Server,
    StartError,
    available_cpus,
    background_cpu,
    count_errors,
    pin,
    pin_self,
    process_tree,
    raise_fd_limit,
    start_gateway,
    start_minimal_http_relay,
    start_minimal_relay,
    start_reference,
    start_stub,
    status_kb,
    stop,
    wait_idle,
)
from bench_report import Row, budget_lines, budgets_json, machine_info, table, write_json
from bench_sse import (
    ConcurrentResult,
    SequentialResult,
    concurrent_streams,
    interleaved_streams,
    percentile,
    post_json,
    set_chunk_delay,
)
from bench_wrk import WrkResult, run_wrk, write_script, wrk_path
from litellm_proxy import LITELLM_VERSION, start_litellm, stop_group
from litellm_proxy import ensure_installed as ensure_litellm
from litellm_proxy import install_error as litellm_install_error
from vllm_router import POLICY as ROUTER_POLICY
from vllm_router import ROUTER_VERSION, start_router
from vllm_router import ensure_installed as ensure_router
from vllm_router import install_error as router_install_error

OPENAI_PATH = "/v1/chat/completions"
TIDE_PATH = "/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
BUSY_WARNING = 10.0  # % of all CPUs used by others while the benchmark is idle


def openai_body(max_tokens: int, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": "bench-model", "messages": MESSAGES, "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def tide_body(max_tokens: int, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"prompt": "hi", "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


@dataclass(frozen=True)
class Placement:
    """Which CPUs each process may use (on 2 cores: the stub on one, tide-vllm on the other)."""

    every: set[int]
    one_core: set[int]
    stub: set[int]
    gateway: set[int]
    load_direct: set[int]  # the load generator when the stub is measured
    load_through: set[int]  # … when tide-vllm is measured

    @classmethod
    def for_cpus(cls, cpus: list[int]) -> Placement:
        first, second = {cpus[0]}, {cpus[min(1, len(cpus) - 1)]}
        rest = set(cpus[2:])
        return cls(set(cpus), first, first, second, rest or second, rest or first)


@dataclass(frozen=True)
class Settings:
    seconds: float
    stream_seconds: float
    chunks: int
    streams: int
    stream_delay: float
    paced_delay: float
    log_level: str


@dataclass
class Bench:
    """The running processes, and where the results go."""

    python: str
    stub: Server
    gateway: Server
    place: Placement
    settings: Settings
    workdir: Path
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    background: dict[str, float] = field(default_factory=dict)
    gateway_errors: dict[str, Any] = field(default_factory=dict)
    exit_codes: list[int | None] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    settle_seconds: list[float] = field(default_factory=list)
    also_settle: list[Server] = field(default_factory=list)  # another server being measured

    def place_servers(self, stub: set[int], gateway: set[int]) -> None:
        pin(self.stub.pid, stub)
        pin(self.gateway.pid, gateway)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        direct, through = (f"{v:,.3f}" if v is not None else "-" for v in (row.direct, row.through))
        print(f"  {row.name}: {direct} → {through} {row.unit}", flush=True)

    def settle(self) -> None:
        """Let both servers finish what a previous run's clients left behind, so that no run
        pays for another (a wrk run ends with every connection's request abandoned)."""
        for server in (self.gateway, self.stub, *self.also_settle):
            waited = wait_idle(server.pid)
            if waited > 1:
                print(f"  ({server.name} was busy {waited:.1f} s after the run before)")
                self.settle_seconds.append(round(waited, 1))

    def stop_gateway(self) -> None:
        """SIGTERM; keeps its exit code and the ERROR lines it logged."""
        self.exit_codes.append(stop(self.gateway))
        count, first = count_errors(self.gateway.log)
        if count:
            self.gateway_errors[self.gateway.log.stem] = {"error_lines": count, "first": first}
            print(f"  ! tide-vllm logged {count} ERROR lines, e.g. {first[:160]}")

    def new_phase(self, name: str, workers: int | None = None) -> None:
        """A fresh tide-vllm for every phase, so that none inherits another's connection pool
        or backlog; and a look at how busy the machine is without us."""
        self.stop_gateway()
        self.gateway = start_gateway(
            self.python,
            self.stub.port,
            self.workdir,
            workers=workers,
            name=name,
            log_level=self.settings.log_level,
        )
        announce(self, name)


# -- wrk measurements -------------------------------------------------------------------------
def wrk(
    bench: Bench,
    url: str,
    body: bytes,
    connections: int,
    cpus: set[int] | None,
    seconds: float | None = None,
) -> WrkResult:
    """A 1 s warm-up, then the measured run (`seconds`, by default the settings')."""
    name = f"body-{abs(hash(body))}"
    script = write_script(bench.workdir, name, body.decode())
    seconds = seconds or bench.settings.seconds
    run_wrk(url, script, connections, 1, cpus)
    bench.settle()
    result = run_wrk(url, script, connections, seconds, cpus)
    if result.requests == 0:
        print(f"  ! {url} c={connections}: no answer in {result.seconds:.0f} s; once more")
        bench.anomalies.append(f"no answer from {url} at c={connections}; run again")
        time.sleep(2)
        result = run_wrk(url, script, connections, seconds, cpus)
    if result.errors or result.non_2xx:
        print(f"  ! {url} c={connections}: {result.errors} errors, {result.non_2xx} non-2xx")
    return result


def wrk_trio(
    bench: Bench, connections: int, direct_cpus: set[int] | None, through_cpus: set[int] | None
) -> dict[str, WrkResult]:
    """Direct OpenAI, through OpenAI, through Tide: the same load, one after another."""
    return {
        "direct": wrk(
            bench, bench.stub.url + OPENAI_PATH, openai_body(8), connections, direct_cpus
        ),
        "openai": wrk(
            bench, bench.gateway.url + OPENAI_PATH, openai_body(8), connections, through_cpus
        ),
        "tide": wrk(bench, bench.gateway.url + TIDE_PATH, tide_body(8), connections, through_cpus),
    }


def latency_rows(bench: Bench, label: str, runs: dict[str, WrkResult]) -> None:
    direct = runs["direct"]
    for shape in ("openai", "tide"):
        shown = "OpenAI" if shape == "openai" else "Tide"
        for pct in ("p50", "p99"):
            bench.add(
                Row(
                    f"latency {pct}, 1 conn, {label}, {shown}",
                    "ms",
                    getattr(direct, f"{pct}_ms"),
                    getattr(runs[shape], f"{pct}_ms"),
                )
            )


def measure_latency(bench: Bench) -> None:
    """1 connection: every process on one core, then unpinned. On one core also a whole
    one-token stream with wrk (a C client): an upper bound of the time to first token that the
    client's own work does not inflate, as a Python client's does."""
    place = bench.place
    bench.new_phase("latency at 1 connection (wrk)")
    bench.place_servers(place.one_core, place.one_core)
    one_core = wrk_trio(bench, 1, place.one_core, place.one_core)
    latency_rows(bench, "one core", one_core)
    streams = stream_targets(bench, 1)
    one_token = {
        name: wrk(bench, url, body, 1, place.one_core) for name, (url, body) in streams.items()
    }
    for shape, shown in (("openai", "OpenAI"), ("tide", "Tide")):
        values = (one_token["direct"].p50_ms, one_token[shape].p50_ms)
        name = f"stream of 1 token, whole p50, 1 conn, one core (wrk), {shown}"
        bench.add(Row(name, "ms", *values, note="≥ time to first token"))
    bench.place_servers(place.every, place.every)
    unpinned = wrk_trio(bench, 1, None, None)
    latency_rows(bench, "unpinned", unpinned)
    bench.raw["latency"] = {
        "one_core": {k: asdict(v) for k, v in one_core.items()},
        "one_token_stream": {k: asdict(v) for k, v in one_token.items()},
        "unpinned": {k: asdict(v) for k, v in unpinned.items()},
    }


def measure_throughput(bench: Bench, concurrency: tuple[int, ...] = (32, 256)) -> None:
    """Each concurrency on a fresh tide-vllm, alone on its core."""
    place = bench.place
    raw: dict[str, Any] = {}
    for connections in concurrency:
        bench.new_phase(f"throughput at {connections} connections (wrk)")
        bench.place_servers(place.stub, place.gateway)
        runs = wrk_trio(bench, connections, place.load_direct, place.load_through)
        raw[str(connections)] = {k: asdict(v) for k, v in runs.items()}
        throughput_rows(bench, connections, runs)
    bench.raw["throughput"] = raw


def throughput_rows(bench: Bench, connections: int, runs: dict[str, WrkResult]) -> None:
    direct = runs["direct"]
    for shape, shown in (("openai", "OpenAI"), ("tide", "Tide")):
        through = runs[shape]
        label = f"{connections} conns, {shown}"
        bench.add(Row(f"throughput, {label}", "req/s", direct.rps, through.rps, "throughput"))
        bench.add(Row(f"latency p99, {label}", "ms", direct.p99_ms, through.p99_ms))
        errors = through.errors + through.non_2xx
        if errors or direct.errors or direct.non_2xx:
            direct_errors = direct.errors + direct.non_2xx
            bench.add(Row(f"errors, {label}", "", direct_errors, errors, "count"))


def measure_reference(bench: Bench) -> None:
    """The 20-line FastAPI pass-through of FIELD-NOTES (bench/reference_passthrough.py) under
    the same loads as tide-vllm, OpenAI shape, then its streams one at a time: the floor a
    FastAPI app starts from, measured in this run so that a slow or busy machine shows in both."""
    reference = start_reference(bench.python, bench.stub.port, bench.workdir)
    label = "20-line FastAPI pass-through"
    try:
        announce(bench, f"{label}, for reference")
        raw = other_server_loads(bench, reference, label, "reference")
        raw["streaming"] = other_server_streams(bench, reference, label, "reference")
        bench.raw["reference"] = raw
    finally:
        stop(reference)


def measure_floor(bench: Bench) -> None:
    """Two relays in tide-vllm's place, streams one at a time. One only copies bytes
    (bench/minimal_relay.py): what one more process in the path costs on this machine, whatever
    it does. The other parses HTTP and the request's JSON and re-frames the answer, with no
    framework (bench/minimal_http_relay.py): what HTTP itself costs in Python here. What
    tide-vllm adds beyond that is its framework and its own work."""
    for start, label, key in (
        (start_minimal_relay, "minimal byte relay", "floor"),
        (start_minimal_http_relay, "minimal HTTP relay", "http_floor"),
    ):
        relay = start(bench.python, bench.stub.port, bench.workdir)
        try:
            announce(bench, f"{label}, for the floor")
            bench.raw[key] = {
                "streaming": other_server_streams(bench, relay, label, key, unpinned=True)
            }
        finally:
            stop(relay)


def measure_litellm(bench: Bench) -> None:
    """A LiteLLM proxy (one worker, in its own venv: bench/litellm_proxy.py) in front of the
    same stub, under the reference's loads, OpenAI shape; then its streams one at a time.
    Skipped, with one line, when LiteLLM cannot be installed or does not start."""
    label = "LiteLLM proxy"
    litellm = ensure_litellm()
    if litellm is None:
        reason = f"litellm[proxy]=={LITELLM_VERSION} could not be installed"
        print(f"{label}: skipped ({reason}, see above)")
        bench.raw["litellm"] = {"version": LITELLM_VERSION, "skipped": reason,
                                "error": "; ".join(litellm_install_error)}  # fmt: skip
        return
    try:
        proxy = start_litellm(litellm, bench.stub.port, bench.workdir, openai_body(8))
    except StartError as exc:
        print(f"{label} {LITELLM_VERSION} did not start; skipped: {exc}")
        bench.anomalies.append(f"{label} did not start")
        bench.raw["litellm"] = {"version": LITELLM_VERSION, "skipped": str(exc)[-2000:]}
        return
    raw: dict[str, Any] = {"version": LITELLM_VERSION}
    try:
        announce(bench, f"{label} {LITELLM_VERSION}, 1 worker, for comparison")
        raw.update(other_server_loads(bench, proxy, label, "litellm"))
        raw["streaming"] = other_server_streams(bench, proxy, label, "litellm")
    finally:
        raw["exit_code"] = stop_group(proxy)
        bench.raw["litellm"] = raw


def measure_vllm_router(bench: Bench) -> None:
    """vllm-router, the vLLM project's Rust router (in its own venv: bench/vllm_router.py), in
    front of the same stub, its one worker, with policy round_robin (one upstream: every policy
    picks it, so the policy does not matter); the reference's loads, OpenAI shape, then its
    streams one at a time. Skipped, with one line, when it cannot be installed or does not start."""
    label = "vllm-router"
    router = ensure_router()
    if router is None:
        reason = f"vllm-router=={ROUTER_VERSION} could not be installed"
        print(f"{label}: skipped ({reason}, see above)")
        bench.raw["vllm_router"] = {"version": ROUTER_VERSION, "skipped": reason,
                                    "error": "; ".join(router_install_error)}  # fmt: skip
        return
    try:
        server = start_router(router, bench.stub.port, bench.workdir, openai_body(8))
    except StartError as exc:
        print(f"{label} {ROUTER_VERSION} did not start; skipped: {exc}")
        bench.anomalies.append(f"{label} did not start")
        bench.raw["vllm_router"] = {"version": ROUTER_VERSION, "skipped": str(exc)[-2000:]}
        return
    raw: dict[str, Any] = {"version": ROUTER_VERSION, "policy": ROUTER_POLICY, "workers": 1}
    try:
        announce(bench, f"{label} {ROUTER_VERSION}, 1 worker URL, policy {ROUTER_POLICY}")
        raw.update(other_server_loads(bench, server, label, "vllm_router"))
        raw["streaming"] = other_server_streams(bench, server, label, "vllm_router")
    finally:
        raw["exit_code"] = stop_group(server)
        bench.raw["vllm_router"] = raw


def announce(bench: Bench, name: str) -> None:
    busy = background_cpu()
    bench.background[name] = round(busy, 1)
    print(f"{name} (machine busy without us: {busy:.0f}%)", flush=True)
    if busy > BUSY_WARNING:
        print(f"  ! other processes use {busy:.0f}% of the CPUs: these figures will be noisy")


def pin_tree(pid: int, cpus: set[int]) -> None:
    """A server and whatever processes it started."""
    for member in process_tree(pid):
        pin(member, cpus)


ROUNDS = 5  # answers a connection should get, at least, in a measured run
LONGEST_RUN = 30.0  # s


def run_seconds(bench: Bench, connections: int, rate: float) -> float | None:
    """A longer measured run for a server so slow (LiteLLM: ~60 req/s here) that in the
    settings' seconds each of `connections` would get only one answer or none (all of them
    answered at once, after connections / rate seconds), or None for the settings' seconds."""
    needed = ROUNDS * connections / max(rate, 1.0)
    if needed <= bench.settings.seconds:
        return None
    return min(LONGEST_RUN, float(round(needed)))


def other_server_loads(bench: Bench, server: Server, label: str, key: str) -> dict[str, Any]:
    """Another server in front of the stub, OpenAI shape, non-streaming, with tide-vllm's
    loads and placement: 1 connection with every process on one core, then 32 and 256
    connections with `server` alone on its core. Rows named "…, {label}"; the raw results
    under "1", "32", "256", each {"direct": …, key: …}."""
    place = bench.place
    raw: dict[str, Any] = {}
    bench.also_settle.append(server)
    try:
        url, body = server.url + OPENAI_PATH, openai_body(8)
        pin(bench.stub.pid, place.one_core)
        pin_tree(server.pid, place.one_core)
        direct = wrk(bench, bench.stub.url + OPENAI_PATH, body, 1, place.one_core)
        through = wrk(bench, url, body, 1, place.one_core)
        raw["1"] = {"direct": asdict(direct), key: asdict(through)}
        for pct in ("p50", "p99"):
            values = getattr(direct, f"{pct}_ms"), getattr(through, f"{pct}_ms")
            bench.add(Row(f"latency {pct}, 1 conn, one core, {label}", "ms", *values))
        pin(bench.stub.pid, place.stub)
        pin_tree(server.pid, place.gateway)
        rate = through.rps  # the last measured, to size the next run
        for connections in (32, 256):
            seconds = run_seconds(bench, connections, rate)
            note = f"{seconds:.0f} s run" if seconds else ""
            direct = wrk(bench, bench.stub.url + OPENAI_PATH, body, connections, place.load_direct)
            through = wrk(bench, url, body, connections, place.load_through, seconds)
            rate = through.rps or rate
            raw[str(connections)] = {"direct": asdict(direct), key: asdict(through)}
            rps = (direct.rps, through.rps)
            name = f"throughput, {connections} conns, {label}"
            bench.add(Row(name, "req/s", *rps, "throughput", note))
            p99 = (direct.p99_ms, through.p99_ms)
            bench.add(Row(f"latency p99, {connections} conns, {label}", "ms", *p99, note=note))
            errors = (direct.errors + direct.non_2xx, through.errors + through.non_2xx)
            if any(errors):
                bench.add(Row(f"errors, {connections} conns, {label}", "", *errors, "count"))
    finally:
        bench.also_settle.remove(server)
    return raw


def other_server_streams(
    bench: Bench, server: Server, label: str, key: str, unpinned: bool = False
) -> dict[str, Any]:
    """As measure_streaming, OpenAI shape, for another server: one stream after another, every
    process on one core; time to first token with chunks `paced_delay` apart, and the whole
    stream with the chunks back to back; with `unpinned`, the time to first token again with
    every process free to run on any core."""
    s, place = bench.settings, bench.place
    body = openai_body(s.chunks, stream=True)
    targets = {
        "direct": (bench.stub.url + OPENAI_PATH, body),
        key: (server.url + OPENAI_PATH, body),
    }
    pin(bench.stub.pid, place.one_core)
    pin_tree(server.pid, place.one_core)
    pin_self(place.one_core)
    raw: dict[str, Any] = {}
    try:
        for mode, delay in (("paced", s.paced_delay), ("burst", 0.0)):
            asyncio.run(set_chunk_delay(bench.stub.url, delay))
            runs = asyncio.run(interleaved_streams(targets, s.stream_seconds))
            raw[mode] = {name: summary(result) for name, result in runs.items()}
        if unpinned:
            pin_self(place.every)
            pin(bench.stub.pid, place.every)
            pin_tree(server.pid, place.every)
            asyncio.run(set_chunk_delay(bench.stub.url, s.paced_delay))
            runs = asyncio.run(interleaved_streams(targets, s.stream_seconds))
            raw["paced_unpinned"] = {name: summary(result) for name, result in runs.items()}
    finally:
        pin_self(place.every)
        asyncio.run(set_chunk_delay(bench.stub.url, 0.0))
    paced, burst = raw["paced"], raw["burst"]
    note = f"chunks {s.paced_delay * 1000:g} ms apart"
    ttft = (paced["direct"]["ttft_p50_ms"], paced[key]["ttft_p50_ms"])
    bench.add(Row(f"stream time to first token p50, {label}", "ms", *ttft, note=note))
    whole = (burst["direct"]["total_p50_ms"], burst[key]["total_p50_ms"])
    name = f"stream of {s.chunks} chunks, whole p50, {label}"
    bench.add(Row(name, "ms", *whole, note="chunks back to back"))
    if unpinned:
        free = raw["paced_unpinned"]
        ttft = (free["direct"]["ttft_p50_ms"], free[key]["ttft_p50_ms"])
        bench.add(Row(f"stream time to first token p50, unpinned, {label}", "ms", *ttft))
    return raw


# -- streaming --------------------------------------------------------------------------------
def stream_targets(bench: Bench, chunks: int) -> dict[str, tuple[str, bytes]]:
    return {
        "direct": (bench.stub.url + OPENAI_PATH, openai_body(chunks, stream=True)),
        "openai": (bench.gateway.url + OPENAI_PATH, openai_body(chunks, stream=True)),
        "tide": (bench.gateway.url + TIDE_PATH, tide_body(chunks, stream=True)),
    }


def summary(result: SequentialResult) -> dict[str, Any]:
    return {
        "streams": result.streams,
        "ttft_p50_ms": percentile(result.ttft_ms, 50),
        "ttft_p99_ms": percentile(result.ttft_ms, 99),
        "total_p50_ms": percentile(result.total_ms, 50),
        "chunk_p50_ms": percentile(result.chunk_ms, 50),
        "chunk_p99_ms": percentile(result.chunk_ms, 99),
    }


def measure_streaming(bench: Bench) -> None:
    """One stream after another on one connection, every process on one core; then the time
    to first token again unpinned (on one core the client's own work, ~0.6 ms a stream for
    aiohttp here, competes with tide-vllm's; unpinned, wake-ups cross cores instead)."""
    s, place = bench.settings, bench.place
    bench.new_phase(f"streaming, {s.chunks} chunks, one stream at a time (aiohttp)")
    bench.place_servers(place.one_core, place.one_core)
    pin_self(place.one_core)
    raw: dict[str, Any] = {}
    try:
        for mode, delay in (("paced", s.paced_delay), ("burst", 0.0)):
            asyncio.run(set_chunk_delay(bench.stub.url, delay))
            runs = asyncio.run(
                interleaved_streams(stream_targets(bench, s.chunks), s.stream_seconds)
            )
            raw[mode] = {name: summary(result) for name, result in runs.items()}
            stream_rows(bench, mode, delay, raw[mode])
        pin_self(place.every)
        bench.place_servers(place.every, place.every)
        asyncio.run(set_chunk_delay(bench.stub.url, s.paced_delay))
        targets = stream_targets(bench, s.chunks)
        runs = asyncio.run(interleaved_streams(targets, s.stream_seconds))
        unpinned = {name: summary(result) for name, result in runs.items()}
        raw["paced_unpinned"] = unpinned
        for shape, shown in (("openai", "OpenAI"), ("tide", "Tide")):
            values = (unpinned["direct"]["ttft_p50_ms"], unpinned[shape]["ttft_p50_ms"])
            bench.add(Row(f"stream time to first token p50, unpinned, {shown}", "ms", *values))
    finally:
        pin_self(place.every)
        asyncio.run(set_chunk_delay(bench.stub.url, 0.0))
    bench.raw["streaming"] = raw


def stream_rows(bench: Bench, mode: str, delay: float, runs: dict[str, dict[str, Any]]) -> None:
    direct, chunks = runs["direct"], bench.settings.chunks
    for shape, shown in (("openai", "OpenAI"), ("tide", "Tide")):
        through = runs[shape]
        if mode == "paced":
            note = f"chunks {delay * 1000:g} ms apart"
            for key, what in (
                ("ttft_p50_ms", "time to first token p50"),
                ("chunk_p50_ms", "chunk delivery p50"),
                ("chunk_p99_ms", "chunk delivery p99"),
            ):
                bench.add(
                    Row(f"stream {what}, {shown}", "ms", direct[key], through[key], note=note)
                )
            continue
        whole = Row(
            f"stream of {chunks} chunks, whole p50, {shown}",
            "ms",
            direct["total_p50_ms"],
            through["total_p50_ms"],
            note="chunks back to back",
        )
        bench.add(whole)
        per_chunk = (whole.added or 0.0) / chunks
        bench.add(Row(f"  added per chunk, {shown}", "ms", 0.0, per_chunk, note="whole / chunks"))


def measure_many_streams(bench: Bench) -> None:
    """`streams` clients at once, on a fresh tide-vllm for each shape, its memory sampled."""
    s, place = bench.settings, bench.place
    results: dict[str, ConcurrentResult] = {}
    memory: dict[str, float] = {}
    asyncio.run(set_chunk_delay(bench.stub.url, s.stream_delay))
    try:
        pin(bench.stub.pid, place.stub)
        pin_self(place.load_direct)
        print(f"{s.streams} concurrent streams (aiohttp), direct", flush=True)
        targets = stream_targets(bench, s.chunks)
        results["direct"] = asyncio.run(concurrent_streams(*targets["direct"], s.streams, s.chunks))
        pin_self(place.load_through)
        for shape, shown in (("openai", "OpenAI"), ("tide", "Tide")):
            bench.new_phase(f"{s.streams} concurrent streams (aiohttp), {shown}")
            bench.place_servers(place.stub, place.gateway)
            memory[f"{shape}_idle_mb"] = status_kb(bench.gateway.pid, "VmRSS") / 1024
            sampler = RssSampler(bench.gateway.pid)
            sampler.start()
            url, body = stream_targets(bench, s.chunks)[shape]
            results[shape] = asyncio.run(concurrent_streams(url, body, s.streams, s.chunks))
            memory[f"{shape}_peak_mb"] = sampler.stop() / 1024
            memory[f"{shape}_hwm_mb"] = status_kb(bench.gateway.pid, "VmHWM") / 1024
    finally:
        pin_self(place.every)
        asyncio.run(set_chunk_delay(bench.stub.url, 0.0))
    many_stream_rows(bench, results, memory)
    bench.raw["many_streams"] = {
        "settings": {"streams": s.streams, "chunks": s.chunks, "chunk_delay_s": s.stream_delay},
        "memory": memory,
        **{name: concurrent_summary(r) for name, r in results.items()},
    }


def concurrent_summary(result: ConcurrentResult) -> dict[str, Any]:
    plain = {k: v for k, v in asdict(result).items() if k not in ("ttft_ms", "total_ms")}
    return {
        **plain,
        "ttft_p50_ms": percentile(result.ttft_ms, 50),
        "ttft_p99_ms": percentile(result.ttft_ms, 99),
        "total_p50_ms": percentile(result.total_ms, 50),
        "total_p99_ms": percentile(result.total_ms, 99),
    }


def many_stream_rows(
    bench: Bench, results: dict[str, ConcurrentResult], memory: dict[str, float]
) -> None:
    s, direct = bench.settings, results["direct"]
    note = f"{s.streams} × {s.chunks} chunks, {s.stream_delay * 1000:g} ms apart"
    for shape, shown in (("openai", "OpenAI"), ("tide", "Tide")):
        r = results[shape]
        label = f"{s.streams} streams, {shown}"
        bench.add(Row(f"{label}: errors", "", direct.errors, r.errors, "count", note))
        bench.add(Row(f"{label}: all done in", "s", direct.seconds, r.seconds, "info"))
        for what, pct in (("first token", 50), ("first token", 99), ("whole stream", 99)):
            values = "ttft_ms" if what == "first token" else "total_ms"
            bench.add(
                Row(
                    f"{label}: {what} p{pct}",
                    "ms",
                    percentile(getattr(direct, values), pct),
                    percentile(getattr(r, values), pct),
                )
            )
        bench.add(
            Row(
                f"{label}: tide-vllm peak RSS",
                "MB",
                memory[f"{shape}_idle_mb"],
                memory[f"{shape}_peak_mb"],
                "memory",
                "direct column: tide-vllm idle",
            )
        )
        for error in r.first_errors:
            print(f"  ! {shown}: {error[:200]}")


# -- the optional multi-worker run --------------------------------------------------------------
def measure_workers(bench: Bench, workers: int) -> None:
    """tide-vllm again with `web.workers: N` (unpinned); skipped if the key is refused."""
    raw: dict[str, Any] = {"workers": workers}
    for connections in (32, 256):
        try:
            bench.new_phase(f"throughput at {connections} connections, {workers} workers", workers)
        except ConfigRejected as exc:
            print(f"  skipped: {exc}")
            bench.raw["workers"] = {**raw, "skipped": str(exc)}
            return
        bench.place_servers(bench.place.every, bench.place.every)
        runs = wrk_trio(bench, connections, None, None)
        raw[str(connections)] = {k: asdict(v) for k, v in runs.items()}
        for shape, shown in (("openai", "OpenAI"), ("tide", "Tide")):
            name = f"throughput, {connections} conns, {shown}, {workers} workers"
            rps = (runs["direct"].rps, runs[shape].rps)
            bench.add(Row(name, "req/s", *rps, "throughput", "unpinned"))
    bench.raw["workers"] = raw


# -- the run ----------------------------------------------------------------------------------
def sanity_check(bench: Bench) -> None:
    """One request of each shape through tide-vllm, before anything is measured."""
    checks: list[tuple[str, bytes, Callable[[dict[str, Any]], bool]]] = [
        (OPENAI_PATH, openai_body(8), lambda b: b.get("object") == "chat.completion"),
        (TIDE_PATH, tide_body(8), lambda b: bool(b.get("content")) and b.get("error") is None),
    ]
    for path, body, ok in checks:
        status, answer = asyncio.run(post_json(bench.gateway.url + path, body))
        if status != 200 or not ok(answer):
            raise SystemExit(f"bench: {path} through tide-vllm answered {status}: {answer}")


PHASES: dict[str, Callable[[Bench], None]] = {
    "latency": measure_latency,
    "throughput": measure_throughput,
    "streaming": measure_streaming,
    "streams": measure_many_streams,
    "reference": measure_reference,
    "floor": measure_floor,
    "litellm": measure_litellm,
    "vllm_router": measure_vllm_router,
}


def run_all(bench: Bench, phases: list[str], workers: int | None) -> None:
    sanity_check(bench)
    for phase in phases:
        PHASES[phase](bench)
    if workers:
        measure_workers(bench, workers)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure what tide-vllm adds in front of a fast stub upstream.",
        epilog="`--real --tide-url URL --vllm-url URL`: compare a real vLLM with tide-vllm "
        "in front of it instead (bench/real_vllm.py).",
    )
    add = parser.add_argument
    add("--seconds", type=float, default=5, help="each wrk run (default 5)")
    add("--stream-seconds", type=float, default=4, help="each one-at-a-time streaming run")
    add("--chunks", type=int, default=64, help="content chunks per stream (default 64)")
    add("--streams", type=int, default=1000, help="concurrent streams (default 1000)")
    add("--stream-delay", type=float, default=0.02, help="s between chunks, concurrent streams")
    add("--paced-delay", type=float, default=0.001, help="s between chunks, chunk latency run")
    add(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING"],
        help="tide-vllm's log.level (INFO: with its access log, one line per request; "
        "default WARNING)",
    )
    add("--workers", type=int, help="also measure throughput with web.workers: N")
    add("--wait-quiet", type=float, default=30, help="s to wait for other work to end first")
    add("--only", nargs="+", choices=list(PHASES), default=list(PHASES), help="these phases")
    add("--output", type=Path, default=REPO / "bench" / "results" / "latest.json")
    add("--real", action="store_true", help="the real-vLLM comparison instead")
    add("--tide-url", help="with --real: tide-vllm's base URL")
    add("--vllm-url", help="with --real: vLLM's base URL")
    add("--vllm-api-key", help="with --real: vLLM's bearer key (or $BENCH_VLLM_API_KEY)")
    return parser.parse_args(argv)


def run_real(args: argparse.Namespace) -> int:
    import real_vllm

    if not (args.tide_url and args.vllm_url):
        raise SystemExit("bench: --real needs --tide-url and --vllm-url")
    forwarded = ["--tide-url", args.tide_url, "--vllm-url", args.vllm_url]
    if args.vllm_api_key:
        forwarded += ["--vllm-api-key", args.vllm_api_key]
    return real_vllm.main(forwarded)


def measure(args: argparse.Namespace, settings: Settings, workdir: Path) -> Bench:
    python = sys.executable
    stub = start_stub(python, workdir)
    try:
        gateway = start_gateway(python, stub.port, workdir, name="sanity check")
    except BaseException:
        stop(stub)
        raise
    place = Placement.for_cpus(available_cpus())
    bench = Bench(python, stub, gateway, place, settings, workdir)
    try:
        run_all(bench, args.only, args.workers)
    finally:
        bench.stop_gateway()
        stop(stub)
        keep_logs(workdir, args.output.parent / "logs")
    return bench


def keep_logs(workdir: Path, target: Path) -> None:
    """The servers' logs beside the results (tide-vllm's tracebacks are evidence)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("*.log"):
        shutil.copy2(log, target / log.name)


def report(bench: Bench, args: argparse.Namespace, elapsed: float) -> None:
    print()
    print(table(bench.rows))
    print()
    print(budget_lines(bench.raw))
    busy = max(bench.background.values(), default=0.0)
    codes = sorted(set(bench.exit_codes), key=str)
    print(f"\n{elapsed:.0f} s in all; tide-vllm exit codes after SIGTERM: {codes}")
    if busy > BUSY_WARNING:
        print(f"! the machine was up to {busy:.0f}% busy with other work: figures are noisy")
    payload = {
        "machine": machine_info(REPO),
        "settings": {
            **asdict(bench.settings),
            "placement": {k: sorted(v) for k, v in asdict(bench.place).items()},
        },
        "rows": [row.as_json() for row in bench.rows],
        "raw": bench.raw,
        "budgets": budgets_json(bench.raw),
        "background_cpu_pct": bench.background,
        "gateway_errors": bench.gateway_errors,
        "gateway_exit_codes": bench.exit_codes,
        "anomalies": bench.anomalies,
        "settle_seconds": bench.settle_seconds,
        "elapsed_s": round(elapsed, 1),
    }
    write_json(args.output, payload)
    print(f"results: {args.output}")


def wait_quiet(limit: float) -> None:
    """Up to `limit` seconds for the machine to be idle (another test run, a vLLM)."""
    deadline = time.monotonic() + limit
    busy = background_cpu(1.0)
    while busy > BUSY_WARNING and time.monotonic() < deadline:
        print(f"bench: other processes use {busy:.0f}% of the CPUs; waiting for them", flush=True)
        busy = background_cpu(5.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.real:
        return run_real(args)
    wrk_path()
    raise_fd_limit()
    settings = Settings(
        args.seconds,
        args.stream_seconds,
        args.chunks,
        args.streams,
        args.stream_delay,
        args.paced_delay,
        args.log_level,
    )
    if "litellm" in args.only:
        ensure_litellm()  # on first use, before anything is measured (about a minute)
    if "vllm_router" in args.only:
        ensure_router()  # on first use, before anything is measured (about 15 s)
    wait_quiet(args.wait_quiet)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tide-bench-") as tmp:
        bench = measure(args, settings, Path(tmp))
    report(bench, args, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
