"""The fleet benchmark's two real CPU vLLM replicas: started once, shared by every run.

Each replica is pinned to a core of its own (`taskset -c i` and VLLM_CPU_OMP_THREADS_BIND=i),
so that neither steals the other's CPU and their figures are comparable; its KV cache is made
small on purpose (`--num-gpu-blocks-override 48`: 6,144 tokens) so that where a request lands
decides whether its prefix is still cached. VLLM_SERVER_DEV_MODE=1 adds
`POST /reset_prefix_cache`, which empties the cache before every run so no run inherits
another's; `--enable-scale-out` adds `POST /v1/chat/completions/render`, which vllm-router's
cache_aware calls to see the prompt (without it, vLLM answers 403 and cache_aware quietly
spreads requests instead). Each replica also publishes its KV-cache events
(`--kv-events-config`, ZeroMQ) on a socket file of its own, `<workdir>/kv-r<i>.sock` (vLLM binds
an ipc:// endpoint), recorded as `extra["kv_events_endpoint"]` for tide-vllm's precise mode
(row tide-prefix-kv); the publisher is passive, so the other rows are unaffected. Each replica
runs in a process group of its own (start_new_session): the API server forks EngineCore and
Worker, and only a signal to the group ends them all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_proc import Server, StartError, free_port, log_tail
from fleet_report import RUNNING, WAITING, counters, samples
from litellm_proxy import stop_group

VLLM_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"  # as tide-vllm launches it
KV_BLOCKS = 48
MAX_NUM_SEQS = 16
# max-model-len must fit the small KV cache; otherwise vLLM's defaults: the model's own dtype
# (bfloat16) and compiled graphs. FLOAT32_EAGER (`--float32-eager`) is how tide-vllm's CPU
# profile (conf/tide-vllm.cpu.yaml) serves the demo model for the tests, the same arithmetic on
# every x86-64 CPU: slower here (TTFT about 1.5 x, a fifth fewer requests/s; cores saturated).
FLAGS = ["--max-model-len", "4096"]
FLOAT32_EAGER = ["--dtype", "float32", "--enforce-eager"]
START_TIMEOUT = 900.0  # s; two replicas start together on two busy cores
PROGRESS_EVERY = 20.0  # s between "still starting" lines
# A socket file's path: 108 bytes for Unix, a few less for ZeroMQ's ipc://; as tide-vllm's
# configuration (options.IPC_PATH_MAX), which refuses a longer kv_events_endpoint.
IPC_PATH_MAX = 100
KV_ENDPOINT = "kv_events_endpoint"  # Server.extra's key: where the replica publishes
KV_TMPDIR = "kv_tmpdir"  # Server.extra's key: a folder of our own for the socket, if any


def kv_socket_dir(workdir: Path, replicas: int) -> tuple[Path, bool]:
    """Where the replicas' socket files go: `workdir` if their paths fit in IPC_PATH_MAX
    bytes, else a short folder of our own (True: to be removed with the replicas)."""
    longest = workdir / f"kv-r{replicas - 1}.sock"
    if len(str(longest).encode()) <= IPC_PATH_MAX:
        return workdir, False
    return Path(tempfile.mkdtemp(prefix="tide-kv-")), True


def kv_events_config(endpoint: str) -> str:
    """vLLM's --kv-events-config: publish every KV-cache event on `endpoint` over ZeroMQ."""
    settings = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint}
    return json.dumps(settings, separators=(",", ":"))


def replica_command(
    model_dir: Path,
    model_name: str,
    port: int,
    cpu: int,
    kv_endpoint: str | None = None,
    float32_eager: bool = False,
) -> list[str]:
    kv_events = ["--kv-events-config", kv_events_config(kv_endpoint)] if kv_endpoint else []
    return [
        "taskset", "-c", str(cpu),
        sys.executable, "-m", VLLM_SERVER_MODULE,
        "--model", str(model_dir), "--served-model-name", model_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-prefix-caching",
        "--max-num-seqs", str(MAX_NUM_SEQS),
        "--num-gpu-blocks-override", str(KV_BLOCKS),
        "--enable-scale-out",
        "--disable-uvicorn-access-log",
        *kv_events,
        *FLAGS,
        *(FLOAT32_EAGER if float32_eager else []),
    ]  # fmt: skip


def replica_env(cpu: int) -> dict[str, str]:
    return {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": str(cpu),
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the block override decides what is used
        "HF_HUB_OFFLINE": "1",
    }


def start_replicas(
    model_dir: Path,
    model_name: str,
    cpus: list[int],
    workdir: Path,
    float32_eager: bool = False,
) -> list[Server]:
    """One replica per CPU in `cpus`, launched together, each publishing its KV-cache events
    on a socket file (Server.extra[KV_ENDPOINT]); returns once every one answers
    GET /v1/models (or stops them all and raises StartError). `float32_eager`: serve the model
    as tide-vllm's CPU profile does (FLOAT32_EAGER) instead of in its own dtype, compiled."""
    replicas: list[Server] = []
    sockets, own = kv_socket_dir(workdir, len(cpus))
    try:
        for index, cpu in enumerate(cpus):
            port = free_port()
            log = workdir / f"replica-r{index}.log"
            endpoint = f"ipc://{sockets / f'kv-r{index}.sock'}"
            extra = {"cpu": str(cpu), KV_ENDPOINT: endpoint}
            if own:
                extra[KV_TMPDIR] = str(sockets)
            proc = subprocess.Popen(
                replica_command(model_dir, model_name, port, cpu, endpoint, float32_eager),
                env=replica_env(cpu),
                stdin=subprocess.DEVNULL,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            replicas.append(Server(f"r{index}", proc, port, log, extra))
        _wait_ready(replicas, START_TIMEOUT)
    except BaseException:
        stop_replicas(replicas)
        if own:
            shutil.rmtree(sockets, ignore_errors=True)
        raise
    return replicas


def _wait_ready(replicas: list[Server], timeout: float) -> None:
    started = time.monotonic()
    waiting = list(replicas)
    last_line = started
    with httpx.Client(timeout=5) as client:
        while waiting:
            for replica in list(waiting):
                if replica.proc.poll() is not None:
                    raise StartError(
                        f"replica {replica.name} exited with "
                        f"{replica.proc.returncode}:\n{log_tail(replica.log)}"
                    )
                try:
                    if client.get(replica.url + "/v1/models").status_code == 200:
                        waiting.remove(replica)
                except httpx.HTTPError:
                    pass
            now = time.monotonic()
            if now - started > timeout:
                names = ", ".join(r.name for r in waiting)
                raise StartError(
                    f"replica(s) {names} not ready within {timeout:.0f} s:\n"
                    f"{log_tail(waiting[0].log)}"
                )
            if waiting and now - last_line > PROGRESS_EVERY:
                print(f"fleet: replicas starting, {now - started:.0f} s", flush=True)
                last_line = now
            time.sleep(1)
    print(f"fleet: replicas ready in {time.monotonic() - started:.0f} s", flush=True)


def stop_replicas(replicas: list[Server]) -> None:
    for replica in replicas:
        stop_group(replica)
    for folder in {r.extra[KV_TMPDIR] for r in replicas if KV_TMPDIR in r.extra}:
        shutil.rmtree(folder, ignore_errors=True)


def kill_replica(replica: Server) -> None:
    """SIGKILL to the replica's whole process group: the API server, EngineCore and Worker
    die at once, as in a crash or an OOM kill (no graceful close of connections)."""
    try:
        os.killpg(replica.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- per run --------------------------------------------------------------------------------
def check_render(client: httpx.Client, replica: Server, model: str) -> str:
    """What POST /v1/chat/completions/render answers ("200" when --enable-scale-out took)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    try:
        response = client.post(replica.url + "/v1/chat/completions/render", json=body)
    except httpx.HTTPError as exc:
        return f"error {exc!r}"
    return str(response.status_code)


def read_counters(client: httpx.Client, replica: Server) -> dict[str, float]:
    return counters(client.get(replica.url + "/metrics").raise_for_status().text)


def in_flight(client: httpx.Client, replica: Server) -> float:
    values = samples(client.get(replica.url + "/metrics").raise_for_status().text)
    return values.get(RUNNING, 0.0) + values.get(WAITING, 0.0)


def settle_and_reset(client: httpx.Client, replicas: list[Server], timeout: float = 120) -> None:
    """Wait until no replica has a request running or waiting (a router may still be finishing
    abandoned ones), then empty every prefix cache (retried: vLLM refuses while blocks are
    held). Raises RuntimeError if a cache cannot be emptied."""
    deadline = time.monotonic() + timeout
    for replica in replicas:
        while in_flight(client, replica) > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        while True:
            response = client.post(replica.url + "/reset_prefix_cache")
            if response.status_code != 200:  # 404 without VLLM_SERVER_DEV_MODE=1
                raise RuntimeError(
                    f"replica {replica.name}: POST /reset_prefix_cache answered "
                    f"{response.status_code} {response.text[:200]}"
                )
            if response.json().get("success", True):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"replica {replica.name}: its prefix cache could not be "
                    f"emptied within {timeout:.0f} s (blocks still held)"
                )
            time.sleep(0.5)
