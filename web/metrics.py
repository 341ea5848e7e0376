"""Prometheus metrics of the gateway (prometheus_client), one registry per app.

Names (documented in the README):
  tide_vllm_requests_total{route,shape,status}          requests answered
  tide_vllm_request_duration_seconds{route,shape}       latency, to the last byte
  tide_vllm_time_to_first_token_seconds{shape}          streams: until the first text event
  tide_vllm_prompt_tokens_total{shape}                  tokens, as vLLM counted them
  tide_vllm_completion_tokens_total{shape}
  tide_vllm_requests_in_flight                          requests being served now
  tide_vllm_vllm_up                                     1 when vLLM serves the model, else 0
  tide_vllm_vllm_restarts_total                         restarts of vLLM by the supervisor
  tide_vllm_upstream_errors_total{kind}                 unavailable, timeout, rejected, failed
  tide_vllm_engine_requests_total{engine}               requests dispatched to each engine
  tide_vllm_engine_errors_total{engine}                 of those, failed by the engine
  tide_vllm_engine_retries_total{engine}                failed before running, retried elsewhere
  tide_vllm_engine_in_flight{engine}                    requests on each engine now
  tide_vllm_routing_decisions_total{engine,reason}      affinity, sticky, load, fallback, …
  tide_vllm_engine_up{engine}                           1 when the engine serves its model
"""

from __future__ import annotations

import contextlib
import os
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY, LATENCY_HELP = (
    "tide_vllm_request_duration_seconds",
    "Time to the last byte of the response",
)
TTFT, TTFT_HELP = (
    "tide_vllm_time_to_first_token_seconds",
    "Streams: time until the first event carrying text",
)
REQUESTS_HELP = "Requests answered"
PROMPT_HELP = "Prompt tokens, as vLLM counted them"
COMPLETION_HELP = "Completion tokens"


class _EngineCollector(Collector):
    """The engines' state, read when scraped rather than pushed on every change: `up()` says
    whether every model has a ready engine, `engines()` gives each engine's name, whether it
    serves, and its restarts."""

    def __init__(
        self, up: Callable[[], bool], engines: Callable[[], list[tuple[str, bool, int]]]
    ) -> None:
        self.up, self.engines = up, engines

    def collect(self) -> Iterator[Metric]:
        engines = self.engines()
        yield GaugeMetricFamily(
            "tide_vllm_vllm_up",
            "1 when vLLM serves the model (with several engines: every model has a ready one)",
            value=int(self.up()),
        )
        yield CounterMetricFamily(
            "tide_vllm_vllm_restarts",
            "Restarts of vLLM by the supervisor (all engines)",
            value=sum(restarts for _, _, restarts in engines),
        )
        up = GaugeMetricFamily("tide_vllm_engine_up", "1 when the engine serves", labels=["engine"])
        for name, healthy, _ in engines:
            up.add_metric([name], int(healthy))
        yield up


class _LocalCounts(Collector):
    """The per-request counters and histograms of one process, kept as plain numbers: its event
    loop is one thread, so they need none of prometheus_client's locks (each step of its
    counters takes a lock and four Python calls, and the metrics came to ~8 % of the
    instructions of a relayed request; callgrind). Exposed when scraped, with the names, labels
    and buckets that prometheus_client's own would have (no `_created` series)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], list[float]] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.completion_tokens: dict[str, int] = {}
        self.ttft: dict[str, list[float]] = {}

    def observe(
        self,
        route: str,
        shape: str,
        status: int,
        took: float,
        usage: tuple[int, int] | None = None,
        first_token: float | None = None,
    ) -> None:
        key = (route, shape, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        _observe(self.latency, (route, shape), took)
        if usage is None and first_token is None:
            return
        prompt, completion = usage or (0, 0)  # a shape's counts show from its first chat on
        self.prompt_tokens[shape] = self.prompt_tokens.get(shape, 0) + prompt
        self.completion_tokens[shape] = self.completion_tokens.get(shape, 0) + completion
        if first_token is not None:
            _observe(self.ttft, shape, first_token)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "tide_vllm_requests", REQUESTS_HELP, labels=["route", "shape", "status"]
        )
        for (route, shape, status), count in list(self.requests.items()):
            requests.add_metric([route, shape, str(status)], count)
        yield requests
        yield _histogram(LATENCY, LATENCY_HELP, ["route", "shape"], self.latency)
        yield _histogram(TTFT, TTFT_HELP, ["shape"], {(k,): v for k, v in self.ttft.items()})
        for name, help_text, counts in (
            ("tide_vllm_prompt_tokens", PROMPT_HELP, self.prompt_tokens),
            ("tide_vllm_completion_tokens", COMPLETION_HELP, self.completion_tokens),
        ):
            family = CounterMetricFamily(name, help_text, labels=["shape"])
            for shape, count in list(counts.items()):
                family.add_metric([shape], count)
            yield family


def _observe(histograms: dict[Any, list[float]], key: Any, value: float) -> None:
    """One value into the histogram of `key`: a count per bucket (the last is +Inf), then the
    sum. A value equal to a bound counts in that bound's bucket, as Prometheus's `le` says."""
    counts = histograms.get(key)
    if counts is None:
        counts = histograms[key] = [0.0] * (len(LATENCY_BUCKETS) + 2)
    counts[bisect_left(LATENCY_BUCKETS, value)] += 1
    counts[-1] += value


def _histogram(
    name: str, help_text: str, labels: list[str], histograms: dict[Any, list[float]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text, labels=labels)
    bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    for key, counts in list(histograms.items()):
        cumulative, total = [], 0.0
        for bound, count in zip(bounds, counts[:-1], strict=True):
            total += count
            cumulative.append((bound, total))
        family.add_metric(list(key), cumulative, counts[-1])
    return family


class EngineCounts:
    """Per engine: the routing observer of the application (dispatch, retry, end). Labelled
    children are looked up once per engine and reason."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "tide_vllm_engine_requests", "Requests dispatched to the engine", ["engine"], registry=r
        )
        self.errors = Counter(
            "tide_vllm_engine_errors", "Requests the engine failed", ["engine"], registry=r
        )
        self.retries = Counter(
            "tide_vllm_engine_retries",
            "Requests the engine refused before running them, retried on another",
            ["engine"],
            registry=r,
        )
        self.in_flight = Gauge(
            "tide_vllm_engine_in_flight",
            "Requests on the engine now",
            ["engine"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.decisions = Counter(
            "tide_vllm_routing_decisions",
            "Routing decisions by engine and reason",
            ["engine", "reason"],
            registry=r,
        )
        self._dispatch: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._end: dict[str, tuple[Any, Any]] = {}

    def dispatched(self, engine: str, reason: str) -> None:
        children = self._dispatch.get((engine, reason))
        if children is None:
            children = self._dispatch[(engine, reason)] = (
                self.requests.labels(engine),
                self.decisions.labels(engine, reason),
                self.in_flight.labels(engine),
            )
        children[0].inc()
        children[1].inc()
        children[2].inc()

    def retried(self, engine: str) -> None:
        self.retries.labels(engine).inc()

    def ended(self, engine: str, failed: bool) -> None:
        children = self._end.get(engine)
        if children is None:
            children = self._end[engine] = (
                self.in_flight.labels(engine),
                self.errors.labels(engine),
            )
        children[0].dec()
        if failed:
            children[1].inc()

    def removed(self, engine: str) -> None:
        """The engine left the fleet (discovery no longer finds it) and its last request has
        ended: its series go, rather than stay until a restart. (With several web workers,
        each worker's values are kept in files and stay.)"""
        for metric in (self.requests, self.errors, self.retries, self.in_flight):
            with contextlib.suppress(KeyError):
                metric.remove(engine)
        for engine_, reason in [key for key in self._dispatch if key[0] == engine]:
            del self._dispatch[(engine_, reason)]
            with contextlib.suppress(KeyError):
                self.decisions.remove(engine_, reason)
        self._end.pop(engine, None)


class _SharedCounts:
    """The same, with several web workers: prometheus_client's metrics, whose values go to the
    files the scrape sums across workers. Labelled children are looked up once per label set."""

    def __init__(self, r: CollectorRegistry) -> None:
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._shape_children: dict[str, tuple[Counter, Counter, Histogram]] = {}
        self.requests = Counter(
            "tide_vllm_requests", REQUESTS_HELP, ["route", "shape", "status"], registry=r
        )
        self.latency = Histogram(
            LATENCY, LATENCY_HELP, ["route", "shape"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(TTFT, TTFT_HELP, ["shape"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tide_vllm_prompt_tokens", PROMPT_HELP, ["shape"], registry=r)
        self.completion_tokens = Counter(
            "tide_vllm_completion_tokens", COMPLETION_HELP, ["shape"], registry=r
        )

    def observe(
        self,
        route: str,
        shape: str,
        status: int,
        took: float,
        usage: tuple[int, int] | None = None,
        first_token: float | None = None,
    ) -> None:
        key = (route, shape, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, shape, str(status)),
                self.latency.labels(route, shape),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(took)
        if usage is None and first_token is None:
            return
        chat = self._shape_children.get(shape)
        if chat is None:
            chat = (
                self.prompt_tokens.labels(shape),
                self.completion_tokens.labels(shape),
                self.ttft.labels(shape),
            )
            self._shape_children[shape] = chat
        if usage:
            chat[0].inc(usage[0])
            chat[1].inc(usage[1])
        if first_token is not None:
            chat[2].observe(first_token)


class Metrics:
    """`observe` is the per-request call: one answered request and, for a chat, its token
    counts and, for a stream, its time to the first token. `upstream_errors` and `in_flight`
    are prometheus_client metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        counts: _LocalCounts | _SharedCounts
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several web workers
            counts = _SharedCounts(r)
        else:
            counts = _LocalCounts()
            r.register(counts)
        self.observe = counts.observe
        self.in_flight = Gauge(
            "tide_vllm_requests_in_flight",
            "Requests being served",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "tide_vllm_upstream_errors", "Failed calls to vLLM by kind", ["kind"], registry=r
        )
        self.engines = EngineCounts(r)

    def read_in_flight(self, count: Callable[[], int]) -> bool:
        """Let the in-flight gauge read `count` when scraped (nothing to do per request);
        False with several workers, whose gauges must be pushed (multiprocess mode)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return False
        self.in_flight.set_function(count)
        return True

    def watch_engines(
        self, up: Callable[[], bool], engines: Callable[[], list[tuple[str, bool, int]]]
    ) -> None:
        self._engine = _EngineCollector(up, engines)
        self.registry.register(self._engine)

    def exposition(self) -> bytes:
        """The text format; with several web workers, their metrics summed."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        registry.register(self._engine)
        return generate_latest(registry)
