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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _EngineCollector(Collector):
    """vLLM's state, read when scraped rather than pushed on every change."""

    def __init__(self, up: Callable[[], bool], restarts: Callable[[], int]) -> None:
        self.up, self.restarts = up, restarts

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "tide_vllm_vllm_up", "1 when vLLM serves the model, else 0", value=int(self.up())
        )
        yield CounterMetricFamily(
            "tide_vllm_vllm_restarts", "Restarts of vLLM by the supervisor", value=self.restarts()
        )


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._shape_children: dict[str, tuple[Counter, Counter, Histogram]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tide_vllm_requests", "Requests answered", ["route", "shape", "status"], registry=r
        )
        self.latency = Histogram(
            "tide_vllm_request_duration_seconds",
            "Time to the last byte of the response",
            ["route", "shape"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tide_vllm_time_to_first_token_seconds",
            "Streams: time until the first event carrying text",
            ["shape"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tide_vllm_prompt_tokens", "Prompt tokens, as vLLM counted them", ["shape"], registry=r
        )
        self.completion_tokens = Counter(
            "tide_vllm_completion_tokens", "Completion tokens", ["shape"], registry=r
        )
        self.in_flight = Gauge(
            "tide_vllm_requests_in_flight",
            "Requests being served",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "tide_vllm_upstream_errors", "Failed calls to vLLM by kind", ["kind"], registry=r
        )

    def observe_request(self, route: str, shape: str, status: int, took: float) -> None:
        """One answered request; the labelled children are looked up once per label set."""
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

    def observe_chat(
        self, shape: str, usage: tuple[int, int] | None, first_token: float | None
    ) -> None:
        """A chat's token counts and, for a stream, its time to the first token."""
        children = self._shape_children.get(shape)
        if children is None:
            children = (
                self.prompt_tokens.labels(shape),
                self.completion_tokens.labels(shape),
                self.ttft.labels(shape),
            )
            self._shape_children[shape] = children
        if usage:
            children[0].inc(usage[0])
            children[1].inc(usage[1])
        if first_token is not None:
            children[2].observe(first_token)

    def read_in_flight(self, count: Callable[[], int]) -> bool:
        """Let the in-flight gauge read `count` when scraped (nothing to do per request);
        False with several workers, whose gauges must be pushed (multiprocess mode)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return False
        self.in_flight.set_function(count)
        return True

    def watch_engine(self, up: Callable[[], bool], restarts: Callable[[], int]) -> None:
        self._engine = _EngineCollector(up, restarts)
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
