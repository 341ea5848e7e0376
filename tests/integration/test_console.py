"""What the operator sees: the real service process on the fake vLLM. Ctrl-C stops it with the
lines of a graceful stop and exit 0, without a traceback from tide-vllm or vLLM; JSON logs keep
the parts of vLLM's lines apart; the health probe stays out of the log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.helpers import MAIN, PYTHON, alive, descendants
from tests.service import ServiceProcess, fake_vllm_config


def assert_a_clean_stop(code: int, log: str) -> None:
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]
    assert "received SIGINT: shutting down" in log
    assert "tide-vllm stopped (exit code 0)" in log


def test_ctrl_c_stops_with_the_lines_of_a_graceful_stop_and_exit_0(tmp_path):
    # shutdown_noise: the fake prints what vLLM prints when stopped (an EngineDeadError
    # traceback among it); those lines are the stop's own and stay out of the INFO log.
    service = ServiceProcess(fake_vllm_config("shutdown_noise,grandchild"), tmp_path)
    try:
        service.wait_healthy(timeout=30)
        tree = descendants(service.proc.pid)
        service.proc.send_signal(signal.SIGINT)
        code = service.proc.wait(timeout=60)
        log = service.log()
        assert_a_clean_stop(code, log)
        assert "vLLM state: ready -> stopping" in log and " stopped in " in log
        assert "EngineDeadError" not in log and "[shutdown]" not in log
        deadline = time.monotonic() + 5
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in tree if alive(p)]
    finally:
        service.kill_all()


class TerminalProcess:
    """tide-vllm as a terminal runs it: the leader of its own process group, which a Ctrl-C
    signals as a whole (vLLM runs in a session of its own and is not in it)."""

    def __init__(self, config: dict, tmp_path: Path) -> None:
        path = tmp_path / "tide-vllm.yaml"
        path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{config['web']['bind_address']['port']}"
        self.log_path = tmp_path / "console.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [PYTHON, str(MAIN), "-c", str(path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, ok, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()[-3000:]
            try:
                if ok(httpx.get(self.url + "/health", timeout=2)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready in {timeout}s:\n{self.log()[-3000:]}")

    def ctrl_c(self) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_ctrl_c_reaching_web_workers_still_starting_shows_no_traceback(tmp_path):
    """The terminal's SIGINT reaches the web workers too, the second of which is usually
    still importing when the first one answers."""
    console = TerminalProcess(fake_vllm_config("", web={"workers": 2}), tmp_path)
    try:
        console.wait_for(lambda r: r.status_code == 200)
        assert_a_clean_stop(console.ctrl_c(), console.log())
    finally:
        console.kill()


def test_ctrl_c_while_vllm_starts_stops_it_cleanly(tmp_path):
    console = TerminalProcess(fake_vllm_config("startup_log=60"), tmp_path)
    try:
        # /health says what vLLM is doing while it starts.
        console.wait_for(lambda r: "loading the weights (1 of 2 shards done)" in r.text)
        assert_a_clean_stop(console.ctrl_c(), console.log())
        assert "vLLM state: starting -> stopping" in console.log()
    finally:
        console.kill()


def test_json_logs_keep_vllms_level_source_process_and_message_apart(tmp_path):
    config = fake_vllm_config("startup_log=0", health_interval=0.2)
    config["log"] = {"format": "json"}
    service = ServiceProcess(config, tmp_path)
    try:
        service.wait_healthy(timeout=30)
        time.sleep(1)  # a few health checks
        code, _ = service.terminate()
        assert code == 0
        lines = [json.loads(line) for line in service.log().splitlines()]
    finally:
        service.kill_all()
    vllm = [line for line in lines if line["logger"] == "vllm"]
    ulimit = next(line for line in vllm if "Found ulimit" in line["message"])
    assert ulimit["level"] == "WARNING"
    assert ulimit["message"] == "Found ulimit of 20000 and failed to automatically increase"
    assert (ulimit["source"], ulimit["process"]) == ("system_utils.py:255", "APIServer")
    assert isinstance(ulimit["pid"], int)
    bare = next(line for line in vllm if line["message"].startswith("ValueError: a traceback"))
    assert bare["level"] == "ERROR" and "source" not in bare
    assert not [line for line in vllm if "GET /v1/models" in line["message"]]
