"""The benchmark's output: a table for people, JSON with the machine's description for later."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

Kind = Literal["latency", "throughput", "count", "memory", "info"]


@dataclass(frozen=True)
class Row:
    """One measurement side by side: straight to the stub, and through tide-vllm."""

    name: str
    unit: str
    direct: float | None
    through: float | None
    kind: Kind = "latency"
    note: str = ""

    @property
    def added(self) -> float | None:
        if self.direct is None or self.through is None:
            return None
        if self.kind == "throughput":
            return (self.through / self.direct - 1) * 100 if self.direct else None
        return self.through - self.direct

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "added": self.added, "added_unit": self.added_unit}

    @property
    def added_unit(self) -> str:
        return "%" if self.kind == "throughput" else self.unit


def _number(value: float | None, unit: str, signed: bool = False) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        text = f"{value:+.3f}" if signed else f"{value:.3f}"
    elif unit in ("req/s", "%", "MB", "s", "events/s"):
        text = f"{value:+,.1f}" if signed else f"{value:,.1f}"
    else:
        text = f"{value:+,.0f}" if signed else f"{value:,.0f}"
    return f"{text} {unit}".rstrip()


def table(rows: list[Row]) -> str:
    head = ("measurement", "direct", "through", "added")
    lines = [
        (
            row.name + (f"  [{row.note}]" if row.note else ""),
            _number(row.direct, row.unit),
            _number(row.through, row.unit),
            _number(row.added, row.added_unit, signed=True),
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(4)]
    rule = "  ".join("-" * w for w in widths)

    def fmt(cells: tuple[str, str, str, str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    legend = "direct: straight to the stub; through: via tide-vllm, unless the row names another"
    return "\n".join([legend, "", fmt(head), rule, *(fmt(line) for line in lines)])


# -- the machine ------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _command(*args: str) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    return (
        (done.stdout or done.stderr).strip().splitlines()[0] if done.stdout or done.stderr else None
    )


def machine_info(repo: Path) -> dict[str, Any]:
    packages = (
        "fastapi",
        "starlette",
        "uvicorn",
        "httpx",
        "httpcore",
        "httpx-aiohttp",
        "uvloop",
        "aiohttp",
    )
    commit = _command("git", "-C", str(repo), "rev-parse", "--short", "HEAD")
    dirty = _command("git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": memory_gib(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "wrk": _command("wrk", "--version"),
        "packages": {name: _version(name) for name in packages},
        "git_commit": commit,
        "git_dirty": bool(dirty),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
