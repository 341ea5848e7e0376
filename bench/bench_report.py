"""The benchmark's output: a table for people, the budgets of issue 15 met or not, JSON with the
machine's description for later (`python bench/bench_report.py [results.json]`: a run's budgets)."""

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


# -- the budgets (issue 15) -------------------------------------------------------------------
ADDED_P50_MS = 1.0  # added p50 at 1 connection
RPS_AT_32 = 3000.0  # req/s at 32 connections, one web worker …
P99_AT_32_MS = 25.0  # … with p99 at most this
TTFT_ADDED_MS = 1.0  # time to first token added
STREAMS = 1000  # concurrent streams, none failing
REAL_PCT = 3.0  # on the real engine, within this of direct (bench/real_vllm.py)
SHAPES = (("openai", "OpenAI"), ("tide", "Tide"))
REAL_COMMAND = ".venv/bin/python bench/run.py --real --tide-url URL --vllm-url URL"


@dataclass(frozen=True)
class Budget:
    """One budget checked against one figure of the run; `met` is None when the run did not
    measure it (a phase left out, fewer streams than the budget's)."""

    name: str
    limit: str
    figure: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: "not checked"}[self.met]


def _get(raw: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(raw, dict) or key not in raw:
            return None
        raw = raw[key]
    return raw


def _latency_budgets(raw: dict[str, Any]) -> list[Budget]:
    limit = f"added ≤ {ADDED_P50_MS:g} ms"
    found: list[Budget] = []
    for placement, shown in (("one_core", "one core"), ("unpinned", "unpinned")):
        runs = _get(raw, "latency", placement)
        for shape, shape_name in SHAPES:
            direct, through = _get(runs, "direct", "p50_ms"), _get(runs, shape, "p50_ms")
            if direct is None or through is None:
                continue
            added = through - direct
            figure = f"{added:+.3f} ms ({direct:.3f} → {through:.3f})"
            name = f"p50 at 1 connection, {shown}, {shape_name}"
            found.append(Budget(name, limit, figure, added <= ADDED_P50_MS))
    return found or [Budget("p50 at 1 connection", limit, "phase latency not run", None)]


def _throughput_budgets(raw: dict[str, Any]) -> list[Budget]:
    limit = f"≥ {RPS_AT_32:,.0f} req/s, p99 ≤ {P99_AT_32_MS:g} ms, no errors"
    found: list[Budget] = []
    for shape, shape_name in SHAPES:
        run = _get(raw, "throughput", "32", shape)
        if not isinstance(run, dict):
            continue
        errors = run.get("errors", 0) + run.get("non_2xx", 0)
        rps = run["requests"] / run["seconds"] if run["seconds"] else 0.0  # WrkResult.rps
        figure = f"{rps:,.0f} req/s, p99 {run['p99_ms']:.1f} ms"
        figure += f", {errors:,} errors" if errors else ""
        met = rps >= RPS_AT_32 and run["p99_ms"] <= P99_AT_32_MS and not errors
        found.append(Budget(f"32 connections, 1 worker, {shape_name}", limit, figure, met))
    return found or [Budget("32 connections, 1 worker", limit, "phase throughput not run", None)]


def _ttft_budgets(raw: dict[str, Any]) -> list[Budget]:
    limit = f"added ≤ {TTFT_ADDED_MS:g} ms"
    found: list[Budget] = []
    for mode, shown in (("paced", "one core"), ("paced_unpinned", "unpinned")):
        runs = _get(raw, "streaming", mode)
        for shape, shape_name in SHAPES:
            direct, through = _get(runs, "direct", "ttft_p50_ms"), _get(runs, shape, "ttft_p50_ms")
            if direct is None or through is None:
                continue
            added = through - direct
            figure = f"{added:+.3f} ms ({direct:.3f} → {through:.3f})"
            name = f"time to first token p50, {shown}, {shape_name}"
            found.append(Budget(name, limit, figure, added <= TTFT_ADDED_MS))
    return found or [Budget("time to first token p50", limit, "phase streaming not run", None)]


def _streams_budgets(raw: dict[str, Any]) -> list[Budget]:
    limit = f"{STREAMS:,} at once, 0 errors"
    many = _get(raw, "many_streams")
    if not isinstance(many, dict):
        return [Budget("concurrent streams", limit, "phase streams not run", None)]
    found: list[Budget] = []
    for shape, shape_name in SHAPES:
        run = many.get(shape)
        if not isinstance(run, dict):
            continue
        clients, errors = run["clients"], run["errors"]
        figure = f"{clients:,} streams, {errors:,} errors"
        met: bool | None = not errors
        if met and clients < STREAMS:
            met, figure = None, figure + f" (fewer than {STREAMS:,}: see --streams)"
        found.append(Budget(f"concurrent streams, {shape_name}", limit, figure, met))
    return found


def budgets(raw: dict[str, Any]) -> list[Budget]:
    """The issue's budgets, each checked against the figures in `raw` (a run's raw results,
    as bench/run.py keeps them and writes them under "raw")."""
    return [
        *_latency_budgets(raw),
        *_throughput_budgets(raw),
        *_ttft_budgets(raw),
        *_streams_budgets(raw),
    ]


def budget_lines(raw: dict[str, Any]) -> str:
    checked = budgets(raw)
    name_width = max(len(b.name) for b in checked)
    figure_width = max(len(b.figure) for b in checked)
    met = sum(b.met is True for b in checked)
    missed = sum(b.met is False for b in checked)
    lines = [f"Budgets (issue 15): {met} met, {missed} NOT met, of {len(checked)}", ""]
    for b in checked:
        name, figure = b.name.ljust(name_width), b.figure.ljust(figure_width)
        lines.append(f"{b.verdict:>11}  {name}  {figure}  [{b.limit}]")
    lines.append(
        f"{'elsewhere':>11}  on the real engine within {REAL_PCT:g} % of direct: "
        f"bench/real_vllm.py's, run separately: {REAL_COMMAND}"
    )
    return "\n".join(lines)


def budgets_json(raw: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**asdict(b), "verdict": b.verdict} for b in budgets(raw)]


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


def main(argv: list[str] | None = None) -> int:
    """`python bench/bench_report.py [results.json]`: the budgets of a run already made."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else Path(__file__).resolve().parent / "results" / "latest.json"
    print(budget_lines(json.loads(path.read_text())["raw"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
