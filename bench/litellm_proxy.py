"""A LiteLLM proxy in front of the benchmark's stub, for the `litellm` phase of bench/run.py.

LiteLLM is not one of tide-vllm's dependencies and must not become one: it pins its own versions
of FastAPI, uvicorn, httpx, pydantic, openai … which would change what tide-vllm is measured with.
So it lives in a venv of its own, bench/.venv-litellm (not in git), made on first use from the
Python the benchmark runs on, with one pinned release. Without a network that install fails, and
the phase is skipped (`ensure_installed` returns None).

The proxy is started with one worker, uvloop and httptools, its log at ERROR, and nothing that
fetches anything at start (the model cost map is the packaged copy, no telemetry); its config
maps `bench-model` to `openai/bench-model` at the stub's `/v1`. No master key: it would make
LiteLLM check a key on every request, and neither tide-vllm nor the reference checks one here
(LiteLLM refuses to start without one unless told `dangerously_permit_weak_or_unset_master_key`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench_proc import BENCH_DIR, Server, StartError, free_port, install_tool, log_tail

LITELLM_VERSION = "1.108.7"
REQUIREMENT = f"litellm[proxy]=={LITELLM_VERSION}"
VENV = BENCH_DIR / ".venv-litellm"
STAMP = VENV / f".installed-{LITELLM_VERSION}"
INSTALL_TIMEOUT = 900  # s

# Nothing fetched at start, nothing sent anywhere, little logged.
ENVIRONMENT = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",  # older releases
    "LITELLM_TELEMETRY_DISABLED": "true",  # this one's veto
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",  # no .env loaded from the working directory
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
    "DISABLE_SCHEMA_UPDATE": "true",
    "NO_DOCS": "True",
    "NO_REDOC": "True",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}

_installed: list[Path | None] = []  # memo: one attempt per run
install_error: list[str] = []  # why it failed, if it did


def litellm_bin() -> Path:
    return VENV / "bin" / "litellm"


def ensure_installed() -> Path | None:
    """bench/.venv-litellm with litellm[proxy]==LITELLM_VERSION, made if missing; the path of
    its `litellm` command, or None (with one line printed) if it cannot be installed."""
    if _installed:
        return _installed[0]
    result: Path | None = litellm_bin()
    if not STAMP.exists():
        result = _install()
    _installed.append(result)
    return result


def _install() -> Path | None:
    return install_tool(
        "litellm", VENV, [REQUIREMENT, "uvloop", "httptools"], litellm_bin(),
        stamp=STAMP, timeout=INSTALL_TIMEOUT, errors=install_error,
    )  # fmt: skip


# -- the proxy --------------------------------------------------------------------------------
def proxy_config(upstream_port: int) -> str:
    """JSON is YAML: the model list, and LiteLLM's own extras off."""
    config = {
        "model_list": [
            {
                "model_name": "bench-model",
                "litellm_params": {
                    "model": "openai/bench-model",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "bench-dummy-key",
                },
            }
        ],
        "litellm_settings": {
            "telemetry": False,
            "set_verbose": False,
            "json_logs": False,
            "turn_off_message_logging": True,
        },
        # No key asked of clients: neither tide-vllm nor the reference checks one.
        "general_settings": {
            "disable_spend_logs": True,
            "dangerously_permit_weak_or_unset_master_key": True,
        },
    }
    return json.dumps(config, indent=2) + "\n"


def start_litellm(litellm: Path, upstream_port: int, workdir: Path, body: bytes) -> Server:
    """The proxy on a free port; returns once a chat request (`body`) went through it to the
    stub and back."""
    port = free_port()
    config = workdir / "litellm-config.yaml"
    config.write_text(proxy_config(upstream_port))
    log = workdir / "litellm-proxy.log"
    env = {**os.environ, **ENVIRONMENT}
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen(
        [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
         "--num_workers", "1"],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    server = Server("LiteLLM proxy", proc, port, log, {"config": str(config)})
    try:
        wait_answering(server, body, timeout=120)
    except BaseException:
        stop_group(server)
        raise
    return server


def wait_answering(server: Server, body: bytes, timeout: float) -> None:
    """Until POST /v1/chat/completions answers 200 with a chat.completion."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise StartError(
                f"{server.name} exited with {server.proc.returncode}:\n{log_tail(server.log)}"
            )
        request = urllib.request.Request(
            server.url + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
                if response.status == 200 and answer.get("object") == "chat.completion":
                    return
                last = f"HTTP {response.status}: {str(answer)[:200]}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:200]!r}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.25)
    raise StartError(
        f"{server.name}: no chat answer within {timeout:g}s ({last}):\n{log_tail(server.log)}"
    )


def stop_group(server: Server, timeout: float = 15) -> int | None:
    """SIGTERM to the proxy's process group (it may have started children), SIGKILL to what
    is left after `timeout`; the proxy's exit code."""
    proc, group = server.proc, server.pid  # start_new_session: its own group
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return proc.returncode


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
