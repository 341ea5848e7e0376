"""What the gateway reads of an engine's own Prometheus metrics (`GET /metrics` of vLLM): its
queue, its KV cache's use and size, and its prefix cache's hits, for routing and operators."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tide_vllm.domain.fleet.engine import EngineMetrics

WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
CACHE_CONFIG = "vllm:cache_config_info"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"


def parse_engine_metrics(text: str) -> EngineMetrics:
    """The gauges and counters routing uses, summed over the engine's label sets (a vLLM with
    data parallelism reports one set per engine core; the KV cache's use is their mean).
    Raises ValueError on text that is not Prometheus' exposition format, or that lacks the two
    gauges routing needs."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    cache_tokens: int | None = None
    block_tokens: int | None = None
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("vllm:"):
            continue
        for sample in family.samples:
            name = sample.name
            if name == CACHE_CONFIG:
                blocks = sample.labels.get("num_gpu_blocks")
                block_size = sample.labels.get("block_size")
                if blocks and block_size and blocks.isdigit() and block_size.isdigit():
                    cache_tokens = (cache_tokens or 0) + int(blocks) * int(block_size)
                    block_tokens = int(block_size) or None
            elif name in (WAITING, KV_CACHE_USAGE, PREFIX_HITS, PREFIX_QUERIES):
                sums[name] = sums.get(name, 0.0) + sample.value
                counts[name] = counts.get(name, 0) + 1
    if WAITING not in sums or KV_CACHE_USAGE not in sums:
        raise ValueError(f"no {WAITING} or {KV_CACHE_USAGE} among the engine's metrics")
    return EngineMetrics(
        waiting=sums[WAITING],
        kv_cache_usage=sums[KV_CACHE_USAGE] / counts[KV_CACHE_USAGE],  # a mean, not a sum
        cache_tokens=cache_tokens,
        block_tokens=block_tokens,
        prefix_cache_hits=sums.get(PREFIX_HITS),
        prefix_cache_queries=sums.get(PREFIX_QUERIES),
    )
