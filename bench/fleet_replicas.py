"""The fleet benchmark's two real CPU vLLM replicas: started once, shared by every run.

Each replica is pinned to a core of its own (`taskset -c i` and VLLM_CPU_OMP_THREADS_BIND=i),
so that neither steals the other's CPU and their figures are comparable; its KV cache is made
small on purpose (`--num-gpu-blocks-override 48`: 6,144 tokens) so that where a request lands
decides whether its prefix is still cached. VLLM_SERVER_DEV_MODE=1 adds
`POST /reset_prefix_cache`, which empties the cache before every run so no run inherits
another's; `--enable-scale-out` adds `POST /v1/chat/completions/render`, which vllm-router's
cache_aware calls to see the prompt (without it, vLLM answers 403 and cache_aware quietly
spreads requests instead). Each replica runs in a process group of its own (start_new_session):
the API server forks EngineCore and Worker, and only a signal to the group ends them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from bench_proc import Server, StartError, free_port, log_tail
from fleet_report import RUNNING, WAITING, counters, samples
from litellm_proxy import stop_group

VLLM_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"  # as tide-vllm launches it
KV_BLOCKS = 48
MAX_NUM_SEQS = 16
# As conf/tide-vllm.cpu.yaml: float32 is the same arithmetic on every x86-64 CPU, eager mode
# starts in a minute instead of four. max-model-len must fit the small KV cache.
FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "4096"]
START_TIMEOUT = 900.0  # s; two replicas start together on two busy cores
PROGRESS_EVERY = 20.0  # s between "still starting" lines


def replica_command(model_dir: Path, model_name: str, port: int, cpu: int) -> list[str]:
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
        *FLAGS,
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
    model_dir: Path, model_name: str, cpus: list[int], workdir: Path
) -> list[Server]:
    """One replica per CPU in `cpus`, launched together; returns once every one answers
    GET /v1/models (or stops them all and raises StartError)."""
    replicas: list[Server] = []
    try:
        for index, cpu in enumerate(cpus):
            port = free_port()
            log = workdir / f"replica-r{index}.log"
            proc = subprocess.Popen(
                replica_command(model_dir, model_name, port, cpu),
                env=replica_env(cpu),
                stdin=subprocess.DEVNULL,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            replicas.append(Server(f"r{index}", proc, port, log, {"cpu": str(cpu)}))
        _wait_ready(replicas, START_TIMEOUT)
    except BaseException:
        stop_replicas(replicas)
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
