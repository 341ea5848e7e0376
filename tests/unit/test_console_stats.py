"""The console chart's sampler (web/console_stats.py): requests/s and the median time to first
token of each interval, from the gateway's own metrics as a scrape reads them."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from web.console_stats import (
    Reading,
    StatsSampler,
    interval_sample,
    median_of_buckets,
    read_exposition,
)
from web.metrics import LATENCY_BUCKETS, Metrics, _SharedCounts


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> Metrics:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    metrics.watch_engines(up=lambda: True, engines=lambda: [])
    return metrics


def chat(metrics: Metrics, first_token: float | None = None, route: str = "/v1/chat/completions"):
    metrics.observe(route, "openai", 200, 0.5, (10, 5), first_token)


def test_the_first_reading_is_only_the_baseline(metrics):
    sampler = StatsSampler(metrics.exposition, clock=Clock())
    assert sampler.tick() is None
    assert sampler.as_json() == {"interval": 5, "samples": []}


def test_requests_per_second_are_the_growth_over_the_interval(metrics):
    clock = Clock()
    sampler = StatsSampler(metrics.exposition, clock=clock)
    for _ in range(3):
        chat(metrics)
    sampler.tick()
    for _ in range(10):
        chat(metrics)
    chat(metrics, route="/v1/completions")  # relayed to vLLM: counted
    clock.now += 4
    sample = sampler.tick()
    assert sample is not None
    assert sample.requests_per_s == pytest.approx(11 / 4)
    assert sample.t == clock.now
    assert sample.ttft_p50_ms is None  # no stream in the interval


def test_probes_scrapes_and_the_consoles_own_calls_are_not_counted(metrics):
    clock = Clock()
    sampler = StatsSampler(metrics.exposition, clock=clock)
    sampler.tick()
    for route in ("/health", "/ready", "/metrics", "/admin/stats", "/", "/console/{file}", "other"):
        metrics.observe(route, "-", 200, 0.001)
    clock.now += 5
    sample = sampler.tick()
    assert sample is not None and sample.requests_per_s == 0


def test_the_ttft_median_is_interpolated_within_its_bucket_over_the_interval_only(metrics):
    clock = Clock()
    sampler = StatsSampler(metrics.exposition, clock=clock)
    for _ in range(50):
        chat(metrics, first_token=5.0)  # before the interval: must not count
    sampler.tick()
    # Four streams in the interval, all in the bucket (0.1, 0.25]: the median is its middle
    # (rank 2 of 4 in a bucket holding all four).
    for _ in range(4):
        chat(metrics, first_token=0.2)
    clock.now += 5
    sample = sampler.tick()
    assert sample is not None
    assert sample.ttft_p50_ms == pytest.approx(175.0)


def test_the_median_of_buckets_follows_prometheus_histogram_quantile():
    # 10 in (0, 0.1], 10 in (0.1, 0.2]: rank 10 is the top of the first bucket.
    assert median_of_buckets([(0.1, 10), (0.2, 20), (float("inf"), 20)]) == pytest.approx(0.1)
    # 1 in (0, 0.1], 3 in (0.1, 0.5]: rank 2 is a third into the second bucket.
    assert median_of_buckets([(0.1, 1), (0.5, 4), (float("inf"), 4)]) == pytest.approx(
        0.1 + 0.4 / 3
    )
    # Most above the last finite bound: that bound, as Prometheus answers.
    assert median_of_buckets([(60, 1), (float("inf"), 5)]) == 60
    assert median_of_buckets([(0.1, 0), (float("inf"), 0)]) is None
    assert median_of_buckets([]) is None


def test_a_counter_that_went_down_was_reset_and_counts_from_zero():
    before = Reading(100.0, ((0.1, 10.0), (float("inf"), 10.0)))
    after = Reading(6.0, ((0.1, 2.0), (float("inf"), 2.0)))
    sample = interval_sample(before, after, 2.0, 0.0)
    assert sample.requests_per_s == 3.0
    assert sample.ttft_p50_ms == pytest.approx(50.0)


def test_ten_minutes_of_samples_are_kept_oldest_first(metrics):
    clock = Clock()
    sampler = StatsSampler(metrics.exposition, interval=5, window=600, clock=clock)
    sampler.tick()
    for _ in range(130):
        clock.now += 5
        sampler.tick()
    samples = sampler.as_json()["samples"]
    assert len(samples) == 120
    assert samples[0]["t"] < samples[-1]["t"] == clock.now
    assert set(samples[0]) == {"t", "requests_per_s", "ttft_p50_ms"}


def test_prometheus_clients_own_metrics_are_read_the_same():
    """With several web workers the counts are prometheus_client's metrics (_SharedCounts),
    whose exposition also has `_created` samples; the scrape sums the workers'."""
    registry = CollectorRegistry()
    shared = _SharedCounts(registry)
    for first_token in (0.2, 0.2, None):
        shared.observe("/v1/chat/completions", "openai", 200, 0.5, (10, 5), first_token)
    shared.observe("/health", "-", 200, 0.001)
    reading = read_exposition(generate_latest(registry).decode())
    assert reading.requests == 3
    buckets = dict(reading.ttft_buckets)  # cumulative, as Prometheus's `le`
    assert list(buckets) == [*LATENCY_BUCKETS, float("inf")]
    assert buckets[0.1] == 0 and buckets[0.25] == 2 and buckets[float("inf")] == 2


async def test_the_sampler_task_samples_every_interval_until_cancelled(metrics):
    sampler = StatsSampler(metrics.exposition, interval=0.01)
    task = asyncio.create_task(sampler.run())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(sampler.samples()) >= 3
