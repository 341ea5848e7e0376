"""The fleet benchmark (`make bench-fleet`, issue 16): routers side by side in front of the same
two real CPU vLLM replicas, on a shared-prefix, multi-turn, streamed workload.

Set-up: two replicas of the demo model, each pinned to its own core, with prefix caching on and
a KV cache of 6,144 tokens each (bench/fleet_replicas.py), started once and shared by every run.
Workload (bench/fleet_workload.py): 4 groups with a ~920-token system prompt each, 4 users per
group, 6 turns per user (96 requests); a turn adds a 30-word question and the model's real
previous answer; max_tokens 16, temperature 0; all 16 users at once, starting 0.5 s apart, 2 s
of think time; and the hot spot: one group of 10 users, three of 2. Every request is a streamed
`/v1/chat/completions` with `stream_options.include_usage` and `X-Session-Id: <user>`; the time to
first token is measured to the first content event.

Rows, each in front of the same replicas: tide-vllm with `routing.policy: prefix`, the same in
precise mode (tide-prefix-kv: `routing.kv_events: true`, each engine's `kv_events_endpoint` the
socket file its replica publishes its KV-cache events on) and `round_robin`, vllm-router
(bench/.venv-router) with `cache_aware` and `round_robin`, and, last (it kills a replica),
tide-vllm prefix with one replica SIGKILLed half-way. Every run gets a
fresh router process (no router starts with what it learnt in another run) and emptied prefix
caches; the hit rate, the replicas' shares and the request counts come from the replicas' own
/metrics, read before and after.

    .venv/bin/python bench/fleet.py                  # everything (many minutes of both cores)
    .venv/bin/python bench/fleet.py --quick          # smoke run: 1 group of 2 users, 2 turns
    .venv/bin/python bench/fleet.py --only tide-prefix,router-cache_aware
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import httpx
import orjson
from bench_proc import (
    REPO,
    Server,
    StartError,
    available_cpus,
    background_cpu,
    count_errors,
    free_port,
    launch_gateway,
)
from bench_report import machine_info, write_json
from fleet_replicas import (
    KV_ENDPOINT,
    check_render,
    in_flight,
    kill_replica,
    read_counters,
    settle_and_reset,
    start_replicas,
    stop_replicas,
)
from fleet_report import (
    KILL_ROW,
    KV_ROW,
    ROUTER_ROWS,
    ROWS,
    RequestResult,
    RunResult,
    delta,
    routing_decisions,
    table,
    target_lines,
    targets,
)
from fleet_workload import User, Workload, request_body, standard_workloads
from litellm_proxy import stop_group
from vllm_router import ROUTER_VERSION, start_router_for
from vllm_router import ensure_installed as ensure_router

MODEL_NAME = "SmolLM2-135M-Instruct"
RESULTS = REPO / "bench" / "results"
QUICK_ROWS = ("tide-prefix", "router-cache_aware", KILL_ROW)
REQUEST_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
BUSY_WARNING = 10.0  # % of all CPUs used by others between runs
# tide-vllm's rows: routing.policy and routing.kv_events (precise mode).
TIDE_ROUTING = {
    "tide-prefix": ("prefix", False),
    KV_ROW: ("prefix", True),
    "tide-round_robin": ("round_robin", False),
    KILL_ROW: ("prefix", False),
}


def default_model_dir() -> Path:
    """As the Makefile's MODEL_DIR and cmd/prepare-demo-model: $TIDE_VLLM_MODEL_DIR, else
    <$TIDE_VLLM_CACHE or $XDG_CACHE_HOME/tide-vllm or ~/.cache/tide-vllm>/models/<model>."""
    if os.environ.get("TIDE_VLLM_MODEL_DIR"):
        return Path(os.environ["TIDE_VLLM_MODEL_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache = os.environ.get("TIDE_VLLM_CACHE") or str(Path(xdg) / "tide-vllm")
    return Path(cache).expanduser() / "models" / MODEL_NAME


# -- what is measured ---------------------------------------------------------------------------
def tide_config(
    port: int, replicas: list[Server], policy: str, model: str, kv_events: bool = False
) -> str:
    """tide-vllm in front of the replicas as external engines (issue 16's shape); with
    `kv_events`, in precise mode: each engine read at the endpoint its replica publishes on."""

    def engine(r: Server) -> str:
        kv = f", kv_events_endpoint: {json.dumps(r.extra[KV_ENDPOINT])}" if kv_events else ""
        return (
            f"  - {{name: {r.name}, auto_start: false, host: 127.0.0.1, port: {r.port}, "
            f"model_name: {model}{kv}}}\n"
        )

    routing = f"{{policy: {policy}, kv_events: true}}" if kv_events else f"{{policy: {policy}}}"
    return (
        f"web: {{bind_address: {{host: 127.0.0.1, port: {port}}}}}\n"
        f"vllm: {{timeout: 300, model_name: {model}}}\n"
        f"engines:\n{''.join(engine(r) for r in replicas)}"
        f"routing: {routing}\n"
        "log: {level: WARNING}\n"
    )


def start_row(row: str, replicas: list[Server], workdir: Path, router: Path | None) -> Server:
    """A fresh tide-vllm or vllm-router for `row`, ready to serve."""
    if row in TIDE_ROUTING:
        policy, kv_events = TIDE_ROUTING[row]
        port = free_port()
        config = tide_config(port, replicas, policy, MODEL_NAME, kv_events)
        return launch_gateway(sys.executable, port, config, workdir, row, timeout=60)
    assert router is not None and row in ROUTER_ROWS
    policy = row.removeprefix("router-")
    urls = [r.url for r in replicas]
    body = orjson.dumps(
        {"model": MODEL_NAME, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    )
    return start_router_for(router, urls, policy, workdir, body, timeout=120)


async def one_turn(
    client: httpx.AsyncClient, url: str, user: User, turn: int, answers: list[str], max_tokens: int
) -> RequestResult:
    """One streamed request; never raises: what went wrong is in `error`, and whether any
    chunk had arrived before it in `started`."""
    body = request_body(MODEL_NAME, user, turn, answers, max_tokens)
    result = RequestResult(user.user_id, turn, sent=time.perf_counter())
    parts: list[str] = []
    finished = False
    try:
        async with client.stream(
            "POST", url + "/v1/chat/completions", json=body, headers={"X-Session-Id": user.user_id}
        ) as response:
            if response.status_code != 200:
                text = (await response.aread())[:200].decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    chunk = orjson.loads(data)
                    if chunk.get("error"):
                        result.error = f"error event: {str(chunk['error'])[:200]}"
                        break
                    if "choices" not in chunk:
                        continue
                    result.started = True
                    for choice in chunk["choices"]:
                        content = (choice.get("delta") or {}).get("content")
                        if content or choice.get("finish_reason"):
                            if result.first_token is None:
                                result.first_token = time.perf_counter()
                            parts.append(content or "")
                    if chunk.get("usage"):
                        result.prompt_tokens = chunk["usage"].get("prompt_tokens")
                if not finished and result.error is None:
                    result.error = "the stream ended without [DONE]"
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.done = time.perf_counter()
    result.text = "".join(parts)
    return result


async def run_user(
    client: httpx.AsyncClient,
    url: str,
    user: User,
    workload: Workload,
    delay: float,
    results: list[RequestResult],
    progress: asyncio.Event,
) -> None:
    await asyncio.sleep(delay)
    answers: list[str] = []
    for turn in range(workload.turns):
        result = await one_turn(client, url, user, turn, answers, workload.max_tokens)
        results.append(result)
        answers.append(result.text)
        progress.set()
        if turn + 1 < workload.turns:
            await asyncio.sleep(workload.think)


async def drive(
    url: str,
    workload: Workload,
    on_half: Callable[[], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Every user of `workload` against `url`; `on_half` is called (in a thread) once half of
    the requests are done. Returns the results and the run's length: first request sent to
    last answer done."""
    results: list[RequestResult] = []
    progress = asyncio.Event()
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as client:
        users = [
            asyncio.create_task(
                run_user(client, url, user, workload, i * workload.stagger, results, progress)
            )
            for i, user in enumerate(workload.users)
        ]
        if on_half is not None:
            while len(results) < workload.requests / 2 and not all(u.done() for u in users):
                try:
                    await asyncio.wait_for(progress.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
                progress.clear()
            await asyncio.to_thread(on_half)
        await asyncio.gather(*users)
    if not results:
        return results, 0.0
    first = min(r.sent for r in results)
    last = max(r.done or r.sent for r in results)
    return results, last - first


# -- one run ------------------------------------------------------------------------------------
def pick_victim(client: httpx.Client, replicas: list[Server]) -> int:
    """The replica with the most requests in flight (the kill must hurt); r0 on a tie."""
    loads = [in_flight(client, r) for r in replicas]
    return max(range(len(replicas)), key=lambda i: (loads[i], -i))


def run_one(
    row: str,
    workload: Workload,
    replicas: list[Server],
    workdir: Path,
    router: Path | None,
) -> RunResult:
    """Fresh router, emptied caches, counters before; the workload; counters after."""
    server = start_row(row, replicas, workdir, router)
    killed: list[int] = []
    try:
        with httpx.Client(timeout=30) as client:
            settle_and_reset(client, replicas)
            before = [read_counters(client, r) for r in replicas]

            def kill_one() -> None:
                victim = pick_victim(client, replicas)
                print(
                    f"fleet: half the requests done; killing replica r{victim} "
                    f"(SIGKILL to its process group)",
                    flush=True,
                )
                kill_replica(replicas[victim])
                killed.append(victim)

            on_half = kill_one if row == KILL_ROW else None
            results, seconds = asyncio.run(drive(server.url, workload, on_half))
            deltas: list[dict[str, float] | None] = []
            for i, replica in enumerate(replicas):
                if i in killed:
                    deltas.append(None)
                else:
                    deltas.append(delta(before[i], read_counters(client, replica)))
            decisions = {}
            if row.startswith("tide-"):  # why each request went where it went
                decisions = routing_decisions(client.get(server.url + "/metrics").text)
    finally:
        stop_group(server)
    errors, first = count_errors(server.log)
    note = f"{errors} ERROR lines in its log, first: {first[:200]}" if errors else ""
    return RunResult(
        row, workload.name, results, seconds, deltas, killed[0] if killed else None, note,
        decisions,
    )  # fmt: skip


def warm_up(replicas: list[Server]) -> None:
    """One short request to each replica (first requests pay for lazy set-up), and a check
    that the render endpoint vllm-router's cache_aware needs is there."""
    body = {
        "model": MODEL_NAME,
        "max_tokens": 4,
        "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with httpx.Client(timeout=120) as client:
        for replica in replicas:
            client.post(replica.url + "/v1/chat/completions", json=body).raise_for_status()
            status = check_render(client, replica, MODEL_NAME)
            if status != "200":
                print(
                    f"fleet: ! replica {replica.name}: POST /v1/chat/completions/render "
                    f"answered {status}; vllm-router's cache_aware will spread requests "
                    "instead"
                )


def prompt_tokens(replica: Server, workload: Workload) -> int | None:
    """The first user's system prompt, in tokens with the chat template (vLLM's /tokenize)."""
    user = workload.users[0]
    body = {
        "model": MODEL_NAME,
        "add_generation_prompt": False,
        "messages": [{"role": "system", "content": user.system_prompt}],
    }
    try:
        answer = httpx.post(replica.url + "/tokenize", json=body, timeout=30).json()
        return int(answer["count"])
    except (httpx.HTTPError, KeyError, ValueError, TypeError):
        return None


# -- the whole benchmark ------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 group of 2 users, 2 turns, rows " + ",".join(QUICK_ROWS),
    )
    parser.add_argument("--only", help=f"comma-separated rows, of {','.join(ROWS)}")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="the demo model's folder (`make model`; default: $TIDE_VLLM_MODEL_DIR "
        "or ~/.cache/tide-vllm/models/SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--float32-eager",
        action="store_true",
        help="serve the demo model as tide-vllm's CPU profile does (float32, eager mode) "
        "instead of in its own dtype (bfloat16), compiled: slower replicas, saturated cores",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the report goes")
    args = parser.parse_args(argv)
    rows = QUICK_ROWS if args.quick else ROWS
    if args.only:
        rows = tuple(r.strip() for r in args.only.split(",") if r.strip())
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            parser.error(f"--only: unknown row(s) {', '.join(unknown)}; rows: {', '.join(ROWS)}")
    args.rows = [r for r in ROWS if r in rows]  # the kill row last, whatever the order given
    return args


def plan(rows: list[str], workloads: list[Workload]) -> list[tuple[str, Workload]]:
    """Every row on every workload, then the kill variant on the first workload only."""
    runs = [(row, w) for w in workloads for row in rows if row != KILL_ROW]
    if KILL_ROW in rows:
        runs.append((KILL_ROW, workloads[0]))
    return runs


def report(
    runs: list[RunResult], argv: list[str], info: dict[str, object], skipped: list[str]
) -> str:
    command = " ".join([os.path.relpath(sys.executable, REPO), "bench/fleet.py", *argv])
    lines = [
        f"# Fleet benchmark, {info['date']}",
        "",
        f"Command: `{command}`",
        "",
        f"Replicas: {info['replicas']}. Workloads: {info['workloads']}.",
        "",
        table(runs),
        "",
        "Targets (tide-vllm prefix, and tide-prefix-kv if it ran, against the best hit rate and "
        "vllm-router cache_aware):",
        "",
        target_lines(targets(runs)),
    ]
    notes = [f"- skipped: {line}" for line in skipped]
    notes += [f"- {r.workload}, {r.row}: {r.note}" for r in runs if r.note]
    samples = [(r, sorted({q.error for q in r.requests if q.error})) for r in runs]
    notes += [f"- {r.workload}, {r.row}: e.g. {errs[0]}" for r, errs in samples if errs]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # A SIGTERM (kill, a CI's timeout) ends the run as Ctrl-C does: through the `finally` that
    # stops the replicas, rather than leaving them running in their own sessions.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    model_dir = args.model_dir or default_model_dir()
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"fleet: no model in {model_dir}: run `make model` first")
    cpus = available_cpus()
    if len(cpus) < 2:
        raise SystemExit(f"fleet: needs two CPUs, one per replica; this process may use {cpus}")
    router = None
    if any(r in ROUTER_ROWS for r in args.rows):
        router = ensure_router()
        if router is None:
            print("fleet: vllm-router rows skipped (it could not be installed)")
            args.rows = [r for r in args.rows if r not in ROUTER_ROWS]
    workloads = standard_workloads(args.quick)
    runs_planned = plan(args.rows, workloads)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    info: dict[str, object] = machine_info(REPO)
    runs: list[RunResult] = []
    busy: dict[str, float] = {}
    skipped: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tide-fleet-") as tmp:
        workdir = Path(tmp)
        print(f"fleet: starting 2 replicas of {model_dir.name} on CPUs {cpus[:2]} …", flush=True)
        replicas = start_replicas(
            model_dir, MODEL_NAME, cpus[:2], workdir, float32_eager=args.float32_eager
        )
        try:
            warm_up(replicas)
            tokens = prompt_tokens(replicas[0], workloads[0])
            info["replicas"] = (
                f"2 × {MODEL_NAME}, CPUs {cpus[:2]}, 48 KV blocks (6,144 "
                "tokens), max-num-seqs 16, prefix caching, "
                + ("float32, eager" if args.float32_eager else "the model's dtype, compiled")
            )
            info["workloads"] = (
                "; ".join(
                    f"{w.name}: {w.groups} group(s), {len(w.users)} users, {w.turns} turns, "
                    f"{w.requests} requests"
                    for w in workloads
                )
                + f"; system prompt {tokens} tokens"
            )
            info["vllm_router"] = ROUTER_VERSION if router else None
            for row, workload in runs_planned:
                busy[f"{workload.name}/{row}"] = load = background_cpu(
                    1.0, [r.pid for r in replicas]
                )
                warn = (
                    f" (! {load:.0f}% of the CPUs busy without us)" if load > BUSY_WARNING else ""
                )
                print(f"fleet: {workload.name}, {row}{warn} …", flush=True)
                try:
                    run = run_one(row, workload, replicas, workdir, router)
                except StartError as exc:  # one row's router, not the replicas: go on
                    print(f"fleet:   could not start {row}: {exc}", flush=True)
                    skipped.append(f"{workload.name}, {row}: {str(exc).splitlines()[0][:200]}")
                    continue
                runs.append(run)
                print(
                    f"fleet:   {len(run.requests)} requests, {run.errors} errors, "
                    f"{run.seconds:.1f} s",
                    flush=True,
                )
        finally:
            stop_replicas(replicas)
            logs = args.results / "fleet-logs"
            shutil.rmtree(logs, ignore_errors=True)
            logs.mkdir(parents=True, exist_ok=True)
            for log in workdir.glob("*.log"):
                shutil.copy2(log, logs / log.name)
    text = report(runs, argv, info, skipped)
    text += f"\n{time.monotonic() - started:.0f} s in all; logs in {os.path.relpath(logs, REPO)}/\n"
    print()
    print(text)
    out = args.results / f"fleet-{stamp}.md"
    out.write_text(text)
    payload = {
        "machine": info,
        "argv": argv,
        "background_cpu_pct": busy,
        "runs": [r.as_json() for r in runs],
        "targets": [asdict(t) | {"verdict": t.verdict} for t in targets(runs)],
    }
    write_json(out.with_suffix(".json"), json.loads(json.dumps(payload, default=str)))
    print(f"results: {os.path.relpath(out, REPO)} (and .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
