"""Runs the real tide-vllm process (cmd/tide-vllm/main.py) for integration and e2e tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.helpers import MAIN, PYTHON, alive, descendants


def _pid_files_in(config: dict, tmp_dir: Path) -> None:
    """Each engine's pid file (and, beside it, the socket file of its KV-cache events) in the
    test's folder, unless the test chose one: a tide-vllm a test kills leaves them behind, and
    they would pile up in ~/.cache/tide-vllm/run, one per free port."""
    engines = config.get("engines")
    if engines:
        for entry in engines:
            if isinstance(entry, dict) and "name" in entry:
                entry.setdefault("pid_file", str(tmp_dir / f"vllm-{entry['name']}.pid"))
    elif isinstance(config.get("vllm"), dict):
        config["vllm"].setdefault("pid_file", str(tmp_dir / "vllm.pid"))


class ServiceProcess:
    def __init__(self, config: dict, tmp_dir: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        tmp_dir.mkdir(parents=True, exist_ok=True)
        _pid_files_in(config, tmp_dir)
        self.config_path = tmp_dir / "tide-vllm.yaml"
        self.config_path.write_text(yaml.safe_dump(config, allow_unicode=True))
        self.log_path = tmp_dir / "tide-vllm.log"
        self.port = config["web"]["bind_address"]["port"]
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PYTHON, str(MAIN), "-c", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 30) -> None:
        self._wait(lambda r: True, timeout, "listening")

    def wait_healthy(self, timeout: float) -> None:
        self._wait(lambda r: r.status_code == 200, timeout, "healthy")

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"tide-vllm exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                if ok(httpx.get(self.url + "/health", timeout=2)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"tide-vllm not {what} within {timeout}s:\n{self.log()[-4000:]}")

    def terminate(self, timeout: float = 60) -> tuple[int, list[int]]:
        """SIGTERM; returns the exit code and the processes of its tree still alive after."""
        tree = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        return code, [p for p in tree if alive(p)]

    def kill_all(self) -> None:
        """Last-resort cleanup so a failing test never leaks a vLLM."""
        tree = descendants(self.proc.pid) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in tree:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def fake_vllm_config(mode: str = "", web: dict | None = None, **vllm: object) -> dict:
    """A service configuration in auto-start mode on the fake vLLM executable."""
    from tests.helpers import FAKE_VLLM, free_port

    env = dict(vllm.pop("env", {}) or {})  # type: ignore[call-overload]
    return {
        "web": {"bind_address": {"host": "127.0.0.1", "port": free_port()}, **(web or {})},
        "vllm": {
            "auto_start": True,
            "host": "127.0.0.1",
            "port": free_port(),
            "model_name": "fake-model",
            "command": [PYTHON, str(FAKE_VLLM)],
            "env": {"FAKE_VLLM_MODE": mode, **env},
            **vllm,
        },
    }


def fake_fleet_config(
    modes: dict[str, str], web: dict | None = None, pid_dir: Path | None = None, **vllm: object
) -> dict:
    """A configuration with `engines:`, one auto-started fake vLLM per name, each on its own
    port with its own FAKE_VLLM_MODE; `vllm` holds what they share (model, command, …)."""
    from tests.helpers import free_port

    config = fake_vllm_config("", web, **vllm)
    config["engines"] = [
        {
            "name": name,
            "port": free_port(),
            "env": {"FAKE_VLLM_MODE": mode},
            **({"pid_file": str(pid_dir / f"{name}.pid")} if pid_dir else {}),
        }
        for name, mode in modes.items()
    ]
    return config
