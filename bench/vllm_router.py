"""vllm-router in front of the benchmark's stub, for the `vllm_router` phase of bench/run.py.

vllm-router is the vLLM project's own router, written in Rust (PyPI `vllm-router`: a wheel with
the compiled router and a `vllm-router` command). It is not one of tide-vllm's dependencies and
must not become one (it pulls FastAPI, uvicorn, aiohttp … of its own choosing), so, as LiteLLM
(bench/litellm_proxy.py), it lives in a venv of its own, bench/.venv-router (not in git), made on
first use from the Python the benchmark runs on, with one pinned release. Without a network that
install fails, and the phase is skipped (`ensure_installed` returns None).

The router is started with one worker URL, the stub, and `--policy round_robin`: with a single
upstream every policy picks the same one, so the policy does not matter here (round_robin is the
one that keeps no per-request state, such as cache_aware's prefix tree). It waits for the stub's
`/health` before it listens (checked once a second here, not every 30 s), logs at warning, and
retries nothing (a retried request would hide an error from the figures).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench_proc import BENCH_DIR, Server, free_port, install_tool
from litellm_proxy import stop_group, wait_answering

ROUTER_VERSION = "0.1.17"
REQUIREMENT = f"vllm-router=={ROUTER_VERSION}"
POLICY = "round_robin"
VENV = BENCH_DIR / ".venv-router"
STAMP = VENV / f".installed-{ROUTER_VERSION}"
INSTALL_TIMEOUT = 600  # s

_installed: list[Path | None] = []  # memo: one attempt per run
install_error: list[str] = []  # why it failed, if it did

__all__ = [
    "POLICY",
    "ROUTER_VERSION",
    "ensure_installed",
    "install_error",
    "start_router",
    "start_router_for",
    "stop_group",
]


def router_bin() -> Path:
    return VENV / "bin" / "vllm-router"


def ensure_installed() -> Path | None:
    """bench/.venv-router with vllm-router==ROUTER_VERSION, made if missing; the path of its
    `vllm-router` command, or None (with one line printed) if it cannot be installed."""
    if _installed:
        return _installed[0]
    result: Path | None = router_bin()
    if not STAMP.exists():
        result = _install()
    _installed.append(result)
    return result


def _install() -> Path | None:
    return install_tool(
        "vllm-router", VENV, [REQUIREMENT], router_bin(),
        stamp=STAMP, timeout=INSTALL_TIMEOUT, errors=install_error,
    )  # fmt: skip


# -- the router -------------------------------------------------------------------------------
def start_router(router: Path, upstream_port: int, workdir: Path, body: bytes) -> Server:
    """The router on a free port, the stub its one worker; returns once a chat request
    (`body`) went through it to the stub and back."""
    return start_router_for(router, [f"http://127.0.0.1:{upstream_port}"], POLICY, workdir, body)


def start_router_for(
    router: Path,
    worker_urls: list[str],
    policy: str,
    workdir: Path,
    body: bytes,
    *,
    timeout: float = 60,
) -> Server:
    """The router on a free port in front of `worker_urls` with `policy` (the fleet benchmark
    gives it several replicas); returns once a chat request (`body`) went through it and back.
    Its Prometheus listener gets a free port too: the default, 29000, may be taken."""
    port = free_port()
    log = workdir / f"vllm-router-{policy}.log"
    proc = subprocess.Popen(
        [str(router), "--host", "127.0.0.1", "--port", str(port),
         "--worker-urls", *worker_urls, "--policy", policy,
         "--disable-retries", "--log-level", "warning",
         "--worker-startup-check-interval", "1",
         "--prometheus-port", str(free_port())],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    server = Server("vllm-router", proc, port, log, {"policy": policy})
    try:
        wait_answering(server, body, timeout=timeout)
    except BaseException:
        stop_group(server)
        raise
    return server
