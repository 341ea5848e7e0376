"""Processes of the benchmark: the stub upstream and tide-vllm, their CPUs and their memory."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
STUB = BENCH_DIR / "stub_upstream.py"
REFERENCE = BENCH_DIR / "reference_passthrough.py"
MINIMAL_RELAY = BENCH_DIR / "minimal_relay.py"
MINIMAL_HTTP_RELAY = BENCH_DIR / "minimal_http_relay.py"
ENTRY = REPO / "cmd" / "tide-vllm" / "main.py"
EXIT_CONFIG = 2


class StartError(RuntimeError):
    """A server did not come up; the message carries the end of its log."""


class ConfigRejected(StartError):
    """tide-vllm refused its configuration (exit code 2), e.g. a key it does not know yet."""


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def raise_fd_limit() -> None:
    """1,000 streams need ~2,000 sockets in tide-vllm; children inherit this limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- CPUs -------------------------------------------------------------------------------------
def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (threads started later inherit their creator's)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):
            pass


def pin_self(cpus: set[int]) -> None:
    os.sched_setaffinity(0, cpus)


# -- memory -----------------------------------------------------------------------------------
def status_kb(pid: int, key: str) -> int:
    """A `kB` line of /proc/<pid>/status (VmRSS, VmHWM); 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    """Samples VmRSS of one process every `interval` seconds, in a thread of its own so that
    a busy event loop in the load generator does not skip samples."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kb = max(self.peak_kb, status_kb(self.pid, "VmRSS"))
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak_kb


# -- the stub ---------------------------------------------------------------------------------
def start_stub(python: str, workdir: Path) -> Server:
    """The stub prints `PORT <n>` once it listens on a free port of its choosing."""
    return _start_printing_port("stub", [python, str(STUB), "--port", "0"], workdir / "stub.log")


def start_minimal_relay(python: str, upstream_port: int, workdir: Path) -> Server:
    """The byte relay (bench/minimal_relay.py) in front of the stub."""
    command = [python, str(MINIMAL_RELAY), "--port", "0", "--upstream-port", str(upstream_port)]
    return _start_printing_port("minimal relay", command, workdir / "minimal-relay.log")


def start_minimal_http_relay(python: str, upstream_port: int, workdir: Path) -> Server:
    """The HTTP relay without a framework (bench/minimal_http_relay.py) in front of the stub."""
    command = [python, str(MINIMAL_HTTP_RELAY), "--port", "0"]
    command += ["--upstream-port", str(upstream_port)]
    return _start_printing_port("minimal HTTP relay", command, workdir / "minimal-http-relay.log")


def _start_printing_port(name: str, command: list[str], log: Path) -> Server:
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log.open("wb"), start_new_session=True
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("PORT "):
        stop(Server(name, proc, 0, log))
        raise StartError(f"the {name} did not start:\n{log_tail(log)}")
    return Server(name, proc, int(line.split()[1]), log)


# -- tide-vllm --------------------------------------------------------------------------------
def gateway_config(
    port: int, upstream_port: int, workers: int | None, log_level: str = "WARNING"
) -> str:
    web = f"{{bind_address: {{host: 127.0.0.1, port: {port}}}"
    web += f", workers: {workers}}}" if workers else "}"
    return (
        f"web: {web}\n"
        f"vllm: {{auto_start: false, host: 127.0.0.1, port: {upstream_port}, "
        "model_name: bench-model, timeout: 60}\n"
        f"log: {{level: {log_level}}}\n"
    )


def start_gateway(
    python: str,
    upstream_port: int,
    workdir: Path,
    workers: int | None = None,
    name: str = "tide-vllm",
    log_level: str = "WARNING",
) -> Server:
    """tide-vllm in manual mode in front of the stub; returns once GET /health is 200."""
    port = free_port()
    return launch_gateway(
        python, port, gateway_config(port, upstream_port, workers, log_level), workdir, name
    )


def launch_gateway(
    python: str, port: int, config_text: str, workdir: Path, name: str, timeout: float = 30
) -> Server:
    """tide-vllm with the configuration `config_text` (listening on `port`), in a process group
    of its own; returns once GET /health is 200. ConfigRejected if it refuses the file."""
    name = "".join(c if c.isalnum() else "-" for c in name)
    config = workdir / f"{name}.yaml"
    config.write_text(config_text)
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(
        [python, str(ENTRY), "-c", str(config)],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(name, proc, port, log, {"config": str(config)})
    try:
        wait_healthy(server, timeout=timeout)
    except StartError:
        code = stop(server)
        if code == EXIT_CONFIG:
            raise ConfigRejected(f"{name}: configuration refused: {log_tail(log, 3)}") from None
        raise
    return server


def start_reference(python: str, upstream_port: int, workdir: Path) -> Server:
    """The 20-line FastAPI pass-through (bench/reference_passthrough.py) in front of the stub."""
    port = free_port()
    log = workdir / "reference-passthrough.log"
    proc = subprocess.Popen(
        [python, str(REFERENCE), "--upstream", f"http://127.0.0.1:{upstream_port}",
         "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    server = Server("reference pass-through", proc, port, log)
    try:
        wait_healthy(server, timeout=30)
    except StartError:
        stop(server)
        raise
    return server


def wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise StartError(
                f"{server.name} exited with {server.proc.returncode}:\n{log_tail(server.log)}"
            )
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise StartError(
        f"{server.name}: GET /health not 200 within {timeout:g}s:\n{log_tail(server.log)}"
    )


def stop(server: Server, timeout: float = 15) -> int | None:
    """SIGTERM, then SIGKILL after `timeout`; the exit code (negative: killed by a signal)."""
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (tide-vllm's web workers, with `web.workers: N`)."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children") as children:
                    pids.extend(int(child) for child in children.read().split())
        except OSError:
            pass
        i += 1
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process tree (every thread) so far."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, limit: float = 30, window: float = 0.25) -> float:
    """Wait until `pid` uses (almost) no CPU for `window` seconds: after a load run, a server
    may still be working off requests its clients abandoned. Returns the time waited."""
    start = time.monotonic()
    before = cpu_seconds(pid)
    while time.monotonic() - start < limit:
        time.sleep(window)
        now = cpu_seconds(pid)
        if now - before <= 0.02 * window + 0.011:  # under ~2% of a core, one clock tick
            break
        before = now
    return time.monotonic() - start


# -- the machine's other load -----------------------------------------------------------------
def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def background_cpu(seconds: float = 0.5, exclude: Sequence[int] = ()) -> float:
    """How busy the machine is while the benchmark's own processes are idle, in % of all CPUs:
    anything well above 0 is someone else's work (a test suite, a vLLM) and makes noise.
    The CPU time of the process trees in `exclude` is left out (servers of the benchmark's
    own that are never quite idle, such as a vLLM between runs)."""
    ours0 = sum(cpu_seconds(pid) for pid in exclude)
    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    ours = (sum(cpu_seconds(pid) for pid in exclude) - ours0) * os.sysconf("SC_CLK_TCK")
    return max(0.0, 100.0 * (busy1 - busy0 - ours) / max(1, total1 - total0))


def count_errors(log: Path) -> tuple[int, str]:
    """ERROR lines in a tide-vllm log, and the first one."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if " ERROR " in line]
    except OSError:
        return 0, ""
    return len(lines), lines[0] if lines else ""


def install_tool(
    name: str,
    venv: Path,
    packages: list[str],
    command: Path,
    *,
    stamp: Path,
    timeout: float,
    errors: list[str],
) -> Path | None:
    """A comparison tool (LiteLLM, vllm-router) installed into a venv of its own, made afresh:
    the path of its `command`, or None, with one line printed and the reason in `errors`,
    when it cannot be installed (no network): its phase is then skipped."""
    shutil.rmtree(venv, ignore_errors=True)  # a half-made venv, or another version's
    what = " ".join(packages)
    print(f"{name}: installing {what} into {os.path.relpath(venv, BENCH_DIR.parent)} …", flush=True)
    log_path = venv / "install.log"
    started = time.monotonic()
    try:
        # sys.executable is the project's venv; `-m venv` from it builds on the same base Python.
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       capture_output=True, timeout=120)  # fmt: skip
        with log_path.open("wb") as log:
            done = subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input",
                 "--disable-pip-version-check", *packages],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        errors.append(str(exc))
        print(f"{name}: could not install {what} ({exc}); its phase is skipped")
        return None
    seconds = time.monotonic() - started
    if done.returncode != 0 or not command.exists():
        last = log_tail(log_path, 1).strip()
        errors.append(last)
        print(f"{name}: could not install {what} after {seconds:.0f} s ({last[:200]}; "
              f"see {log_path}); its phase is skipped")  # fmt: skip
        return None
    stamp.touch()
    print(f"{name}: installed {what} in {seconds:.0f} s", flush=True)
    return command
