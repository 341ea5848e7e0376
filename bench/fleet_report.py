"""The fleet benchmark's arithmetic and its report: pure functions, no network.

The cluster's prefix-cache hit rate is measured by the replicas themselves (their Prometheus
counters, read before and after a run), not by the router under test: each router could count
its own guesses differently, vLLM counts what it actually reused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bench_sse import percentile
from prometheus_client.parser import text_string_to_metric_families

# vLLM's counters (prometheus_client adds `_total` to a counter's name in the text format).
HITS = "vllm:prefix_cache_hits"
QUERIES = "vllm:prefix_cache_queries"
SUCCESS = "vllm:request_success"
PROMPT_TOKENS = "vllm:prompt_tokens"
COUNTERS = (HITS, QUERIES, SUCCESS, PROMPT_TOKENS)
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"

KV_ROW = "tide-prefix-kv"  # precise mode: routing.kv_events, from the replicas' KV-cache events
TIDE_ROWS = ("tide-prefix", KV_ROW, "tide-round_robin")
ROUTER_ROWS = ("router-cache_aware", "router-round_robin")
KILL_ROW = "tide-prefix-kill"
ROWS = (*TIDE_ROWS, *ROUTER_ROWS, KILL_ROW)  # the kill row last: it leaves one replica


def samples(text: str) -> dict[str, float]:
    """Prometheus text format → {name: sum over every label set}. `_created` samples are
    timestamps, not counts, and are left out."""
    out: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            rest = rest.rsplit("}", 1)[1]
        else:
            name, _, rest = line.partition(" ")
        if name.endswith("_created"):
            continue
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def metric(values: Mapping[str, float], name: str) -> float | None:
    """A counter by its base name, with or without the `_total` suffix; None if absent."""
    for candidate in (name + "_total", name):
        if candidate in values:
            return values[candidate]
    return None


def counters(text: str) -> dict[str, float]:
    """The counters the report needs, by base name; a missing one is an error, so that a
    renamed metric in another vLLM release is not silently read as 0."""
    values = samples(text)
    out = {}
    for name in COUNTERS:
        value = metric(values, name)
        if value is None:
            raise KeyError(f"{name}(_total) is not in vLLM's /metrics")
        out[name] = value
    return out


def routing_decisions(text: str) -> dict[str, float]:
    """tide-vllm's `tide_vllm_routing_decisions_total{engine,reason}`, as "<engine> <reason>"."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "tide_vllm_routing_decisions":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = f"{sample.labels.get('engine')} {sample.labels.get('reason')}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def hit_rate(deltas: Sequence[Mapping[str, float]]) -> float | None:
    """Σ Δhits / Σ Δqueries over the replicas (tokens, as vLLM counts them); None with no
    query at all."""
    queries = sum(d.get(QUERIES, 0.0) for d in deltas)
    hits = sum(d.get(HITS, 0.0) for d in deltas)
    return hits / queries if queries > 0 else None


def shares(deltas: Sequence[Mapping[str, float]], name: str = SUCCESS) -> list[float] | None:
    """Each replica's part of the run's requests (by its own success counter)."""
    total = sum(d.get(name, 0.0) for d in deltas)
    return [d.get(name, 0.0) / total for d in deltas] if total > 0 else None


# -- one request, one run -----------------------------------------------------------------------
@dataclass
class RequestResult:
    """One streamed turn. `started`: at least one event of the stream arrived (a failure after
    that is mid-stream, one before it could have been retried elsewhere)."""

    user_id: str
    turn: int
    sent: float
    first_token: float | None = None
    done: float | None = None
    started: bool = False
    error: str | None = None
    text: str = ""
    prompt_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.first_token - self.sent if self.first_token is not None else None


@dataclass
class RunResult:
    row: str
    workload: str
    requests: list[RequestResult]
    seconds: float
    deltas: list[dict[str, float] | None] = field(default_factory=list)  # None: replica gone
    killed: int | None = None  # the replica killed mid-run (kill variant)
    note: str = ""
    # tide-vllm rows: its routing decisions, "<engine> <reason>" -> count, from its /metrics
    decisions: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.requests)

    @property
    def failed_before_streaming(self) -> int:
        return sum(not r.ok and not r.started for r in self.requests)

    @property
    def failed_mid_stream(self) -> int:
        return sum(not r.ok and r.started for r in self.requests)

    @property
    def ttfts(self) -> list[float]:
        return [t for r in self.requests if r.ok and (t := r.ttft) is not None]

    def ttft_p(self, pct: float) -> float | None:
        values = self.ttfts
        return percentile(values, pct) if values else None

    @property
    def req_per_s(self) -> float:
        done = sum(r.ok for r in self.requests)
        return done / self.seconds if self.seconds > 0 else 0.0

    @property
    def hit_rate(self) -> float | None:
        if self.killed is not None or any(d is None for d in self.deltas):
            return None  # a killed replica's counters are lost with it
        return hit_rate([d for d in self.deltas if d is not None])

    @property
    def shares(self) -> list[float] | None:
        if any(d is None for d in self.deltas):
            return None
        return shares([d for d in self.deltas if d is not None])

    def as_json(self) -> dict[str, object]:
        return {
            "row": self.row,
            "workload": self.workload,
            "seconds": round(self.seconds, 3),
            "requests": len(self.requests),
            "errors": self.errors,
            "failed_before_streaming": self.failed_before_streaming,
            "failed_mid_stream": self.failed_mid_stream,
            "hit_rate": self.hit_rate,
            "ttft_p50": self.ttft_p(50),
            "ttft_p90": self.ttft_p(90),
            "ttft_p99": self.ttft_p(99),
            "req_per_s": self.req_per_s,
            "shares": self.shares,
            "deltas": self.deltas,
            "killed": self.killed,
            "note": self.note,
            "decisions": self.decisions,
            "error_samples": sorted({r.error for r in self.requests if r.error})[:5],
            "turns": self.turns(),
        }

    def turns(self) -> list[dict[str, object]]:
        """Each request on its own, in the order sent, times in seconds from the run's first:
        what the percentiles hide (which turns make the tail)."""
        if not self.requests:
            return []
        origin = min(r.sent for r in self.requests)
        return [
            {
                "user": r.user_id,
                "turn": r.turn,
                "sent": round(r.sent - origin, 3),
                "ttft": None if r.ttft is None else round(r.ttft, 3),
                "latency": None if r.done is None else round(r.done - r.sent, 3),
                "prompt_tokens": r.prompt_tokens,
                "error": r.error,
            }
            for r in sorted(self.requests, key=lambda r: r.sent)
        ]


# -- the report ---------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f} ms"


def table(runs: Sequence[RunResult]) -> str:
    head = (
        "| workload | row | prefix-cache hit rate | TTFT p50 | TTFT p90 | TTFT p99 | req/s "
        "| requests | errors (before streaming / mid-stream) | share r0 / r1 |"
    )
    lines = [head, "|" + "---|" * 10]
    for run in runs:
        share = run.shares
        share_text = " / ".join(f"{s * 100:.0f} %" for s in share) if share else "–"
        if run.killed is not None:
            share_text = f"r{run.killed} killed"
        lines.append(
            f"| {run.workload} | {run.row} | {_pct(run.hit_rate)} | {_ms(run.ttft_p(50))} "
            f"| {_ms(run.ttft_p(90))} | {_ms(run.ttft_p(99))} | {run.req_per_s:.2f} "
            f"| {len(run.requests)} | {run.errors} ({run.failed_before_streaming} / "
            f"{run.failed_mid_stream}) | {share_text} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    what: str
    met: bool | None  # None: not checked (a row it needs did not run)
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT met", None: "not checked"}[self.met]


def targets(runs: Sequence[RunResult]) -> list[Target]:
    """The issue's targets, for each workload that ran: tide-prefix's, then, if it ran on that
    workload, tide-prefix-kv's (lines named "<workload>, tide-prefix-kv: …"); then the kill
    variant's."""
    out: list[Target] = []
    workloads = list(dict.fromkeys(r.workload for r in runs if r.row != KILL_ROW))
    for workload in workloads:
        by_row = {r.row: r for r in runs if r.workload == workload and r.row != KILL_ROW}
        out.extend(_workload_targets(workload, by_row))
        if KV_ROW in by_row:
            out.extend(_workload_targets(workload, by_row, KV_ROW))
    kills = [r for r in runs if r.row == KILL_ROW]
    for run in kills:
        failed = run.failed_before_streaming
        out.append(
            Target(
                f"{run.workload}, kill a replica: 0 failed before streaming",
                failed == 0,
                f"{failed} failed before streaming, {run.failed_mid_stream} mid-stream",
            )
        )
    if not kills:
        out.append(Target("kill a replica: 0 failed before streaming", None, "no kill run"))
    return out


def _workload_targets(
    workload: str, by_row: Mapping[str, RunResult], row: str = "tide-prefix"
) -> list[Target]:
    """`row`'s targets on `workload` (tide-prefix's lines are named by the workload alone)."""
    tide, router = by_row.get(row), by_row.get("router-cache_aware")
    if row != "tide-prefix":
        workload = f"{workload}, {row}"
    out = []
    rates = {row: r.hit_rate for row, r in by_row.items() if r.hit_rate is not None}
    if tide is None or tide.hit_rate is None or not rates:
        out.append(Target(f"{workload}: hit rate within 0.01 of the best", None, "no figure"))
    else:
        best_row = max(rates, key=lambda row: rates[row])
        out.append(
            Target(
                f"{workload}: hit rate within 0.01 of the best",
                tide.hit_rate >= rates[best_row] - 0.01,
                f"{_pct(tide.hit_rate)}, best {_pct(rates[best_row])} ({best_row})",
            )
        )
    tide_p90 = tide.ttft_p(90) if tide else None
    router_p90 = router.ttft_p(90) if router else None
    if tide_p90 is None or router_p90 is None:
        out.append(Target(f"{workload}: TTFT p90 ≤ 0.9 × cache_aware's", None, "no figure"))
    else:
        out.append(
            Target(
                f"{workload}: TTFT p90 ≤ 0.9 × cache_aware's",
                tide_p90 <= 0.9 * router_p90,
                f"{_ms(tide_p90)} vs {_ms(router_p90)} (ratio {tide_p90 / router_p90:.2f})",
            )
        )
    if tide is None or router is None:
        out.append(Target(f"{workload}: req/s ≥ cache_aware's", None, "no figure"))
    else:
        out.append(
            Target(
                f"{workload}: req/s ≥ cache_aware's",
                tide.req_per_s >= router.req_per_s,
                f"{tide.req_per_s:.2f} vs {router.req_per_s:.2f}",
            )
        )
    if tide is None:
        out.append(Target(f"{workload}: 0 errors", None, f"no {row} run"))
    else:
        out.append(Target(f"{workload}: 0 errors", tide.errors == 0, f"{tide.errors} errors"))
    return out


def target_lines(found: Sequence[Target]) -> str:
    return "\n".join(f"- {t.what}: **{t.verdict}** ({t.detail})" for t in found)
