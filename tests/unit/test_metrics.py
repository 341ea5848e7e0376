"""One process keeps its request metrics as plain numbers (web/metrics.py, _LocalCounts); a scrape
must show exactly what prometheus_client's own counters and histograms would (as the workers'
_SharedCounts still use), bucket edges included."""

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from web.metrics import LATENCY_BUCKETS, Metrics, _LocalCounts, _SharedCounts

ROUTE = "/v1/chat/completions"


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[Any]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")  # prometheus_client's creation times; not kept
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[Any]]:
    return name, frozenset(labels.items())


def feed(counts: _LocalCounts | _SharedCounts) -> None:
    # Every bucket edge exactly (a value equal to a bound counts in it), between edges, past the
    # last one; several label sets; token counts with and without a time to first token.
    for took in (*LATENCY_BUCKETS, 0.0004, 0.003):
        counts.observe(ROUTE, "openai", 200, took)
    counts.observe(ROUTE, "openai", 200, 0.7, (18, 7), 0.0049)
    counts.observe(ROUTE, "openai", 200, 75.0, (3, 1), None)
    counts.observe("/chat/completions", "tide", 200, 0.02, None, 0.25)
    counts.observe(ROUTE, "openai", 502, 0.5)
    counts.observe("/health", "-", 200, 0.0001)


def test_a_scrape_shows_what_prometheus_client_would() -> None:
    local_registry, shared_registry = CollectorRegistry(), CollectorRegistry()
    local = _LocalCounts()
    local_registry.register(local)
    shared = _SharedCounts(shared_registry)
    for counts in (local, shared):
        feed(counts)
    expected = samples(shared_registry)
    assert samples(local_registry) == expected
    requests = key("tide_vllm_requests_total", route=ROUTE, shape="openai", status="200")
    assert expected[requests] == len(LATENCY_BUCKETS) + 4
    assert expected[key("tide_vllm_prompt_tokens_total", shape="openai")] == 21
    inf = key("tide_vllm_request_duration_seconds_bucket", route=ROUTE, shape="openai", le="+Inf")
    assert expected[inf] == len(LATENCY_BUCKETS) + 5  # the 502 too: status is not a label here


def test_one_process_counts_without_prometheus_client_metrics(monkeypatch: Any) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    metrics.observe(ROUTE, "openai", 200, 0.003, (5, 2), 0.001)
    text = metrics.exposition().decode()
    assert (
        'tide_vllm_requests_total{route="/v1/chat/completions",shape="openai",status="200"} 1.0'
        in text
    )
    assert 'tide_vllm_time_to_first_token_seconds_count{shape="openai"} 1.0' in text
    assert 'tide_vllm_completion_tokens_total{shape="openai"} 2.0' in text
