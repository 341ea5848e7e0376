"""Closed-loop HTTP load with `wrk` (C, epoll): requests/s and the latency distribution.

A Lua script sets the POST body and, in `done()`, prints the summary as one JSON line, so
nothing is parsed from wrk's human-readable output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_LUA = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,' ..
    '"mean_us":%.1f,"max_us":%.1f,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class WrkMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class WrkResult:
    connections: int
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: int  # socket errors and timeouts
    non_2xx: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise WrkMissing(
            "wrk is not installed (Debian: apt-get install -y wrk; `make bench` does it)"
        )
    return path


def write_script(workdir: Path, name: str, body: str) -> Path:
    script = workdir / f"{name}.lua"
    script.write_text(_LUA.format(body=body))
    return script


def run_wrk(
    url: str,
    script: Path,
    connections: int,
    seconds: float,
    cpus: set[int] | None = None,
    threads: int = 1,
) -> WrkResult:
    """One wrk run; `cpus` pins it (with taskset) so it does not share the measured core."""
    command = [
        wrk_path(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    if cpus and shutil.which("taskset"):
        command = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    return parse(done.stdout, connections, done.stderr)


def parse(stdout: str, connections: int, stderr: str = "") -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[len("WRKJSON ") :])
            return WrkResult(
                connections=connections,
                requests=raw["requests"],
                seconds=raw["duration_us"] / 1e6,
                p50_ms=raw["p50_us"] / 1000,
                p90_ms=raw["p90_us"] / 1000,
                p99_ms=raw["p99_us"] / 1000,
                mean_ms=raw["mean_us"] / 1000,
                max_ms=raw["max_us"] / 1000,
                errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
                non_2xx=raw["status"],
            )
    raise RuntimeError(f"wrk printed no summary:\n{stdout[-800:]}\n{stderr[-800:]}")
